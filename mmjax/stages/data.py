"""The data stage: the only stage that writes datasets and the SentencePiece model.

Every later stage reads what this one wrote and fails with one line naming `--mode=data` when it
is missing, so no stage builds data as a side effect (on a pod that would race across hosts).
On a multi-process run process 0 builds, the others wait, then check that they see the result
(mmjax.multihost.run_once): a worker whose workdir is not shared names the path it looked at.
"""
from __future__ import annotations

import logging
import os

from mmjax import multihost
from mmjax.data import builders, pipeline, text


def run(config, workdir) -> dict:
    """Prepares every split and, for configs with a model, the SentencePiece model."""
    out = multihost.run_once("data stage", lambda: _build(config, workdir),
                             lambda: _visible(config, workdir))
    logging.info("data ready: %s", out)
    return out


def _build(config, workdir) -> dict:
    out = {"num_examples": pipeline.build_dataset(config.data, workdir.data_dir)}
    if "model" in config:
        if workdir.sp_model_is_users:
            text.load_text_tokenizer(workdir.sp_model, users=True)  # exists and loads
            out["sp_model"] = str(workdir.sp_model)
        else:
            train_split = pipeline.image_caption_dataset(config.data, "train", workdir.data_dir)
            out["sp_model"] = text.build_text_tokenizer(config.data, workdir.sp_model, train_split)
    return out


def _visible(config, workdir) -> dict:
    """What `_build` returns, read (never written) by a process other than 0."""
    if config.data.name in builders.EMBEDDED:
        builder = builders.embedded_builder(config.data, os.fspath(workdir.data_dir))
        if not builder.is_prepared():  # never prepare it here: that is process 0's job
            raise multihost.not_visible(builder.data_path, f"dataset {config.data.name!r}")
    # Prepared: build_dataset only reads (a standard TFDS set is the user's, wherever it is).
    sizes = pipeline.build_dataset(config.data, workdir.data_dir)
    out = {"num_examples": sizes}
    if "model" in config:
        if workdir.sp_model_is_users:
            text.load_text_tokenizer(workdir.sp_model, users=True)
        else:
            multihost.require_visible([workdir.sp_model], "the SentencePiece model")
        out["sp_model"] = str(workdir.sp_model)
    return out
