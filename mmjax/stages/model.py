"""The model stage: train the multimodal LM on packed text/image rows (image tokens must exist)."""
from __future__ import annotations

from mmjax import multihost, train
from mmjax.data import image_tokens, pipeline
from mmjax.stages.common import finished, text_tokenizer
from mmjax.tasks.multimodal import MultimodalTask


def build_task(config, workdir) -> MultimodalTask:
    """The trainer task, after checking its inputs exist (each missing one names its stage)."""
    for split in ("train", "validation"):  # the newest missing artifact is named first
        image_tokens.require_tokens(workdir, split)
    tokenizer = text_tokenizer(workdir)
    for split in ("train", "validation"):
        records = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
        image_tokens.load_tokens(workdir, split, len(records))
    return MultimodalTask(config, tokenizer.vocab_size, data=(workdir, tokenizer))


def run(config, workdir, **train_kwargs) -> dict:
    # Every process checks its inputs, and all stop together when one cannot see them.
    task = multihost.together("model stage inputs", lambda: build_task(config, workdir))
    summary = finished(train.train(config, workdir, task, **train_kwargs), "model training")
    return {"step": summary["step"], **summary.get("validation", {})}
