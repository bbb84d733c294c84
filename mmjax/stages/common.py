"""What the stage modules share."""
from __future__ import annotations

from mmjax import train
from mmjax.data import text


def finished(summary: dict, stage: str) -> dict:
    """The training summary, or Preempted when SIGTERM stopped it (so nothing builds on it)."""
    if summary.get("preempted"):
        raise train.Preempted(f"{stage} stopped at step {summary['step']} (SIGTERM); its "
                              "checkpoint is saved: rerun the same command to resume")
    return summary


def text_tokenizer(workdir) -> text.TextTokenizer:
    """The SentencePiece model the data stage trained (or the user's `data.sp_model_path`)."""
    return text.load_text_tokenizer(workdir.sp_model, users=workdir.sp_model_is_users)
