"""The data stage: the only stage that writes datasets and the SentencePiece model.

Every later stage reads what this one wrote and fails with one line naming `--mode=data` when it
is missing, so no stage builds data as a side effect (on a pod that would race across hosts).
"""
from __future__ import annotations

import logging

from mmjax.data import pipeline, text


def run(config, workdir) -> dict:
    """Prepares every split and, for configs with a model, the SentencePiece model."""
    out = {"num_examples": pipeline.build_dataset(config.data, workdir.data_dir)}
    if "model" in config:
        if workdir.sp_model_is_users:
            text.load_text_tokenizer(workdir.sp_model, users=True)  # exists and loads
            out["sp_model"] = str(workdir.sp_model)
        else:
            train_split = pipeline.image_caption_dataset(config.data, "train", workdir.data_dir)
            out["sp_model"] = text.build_text_tokenizer(config.data, workdir.sp_model, train_split)
    logging.info("data ready: %s", out)
    return out
