"""The stages of the data flow, each a function of (config, workdir), run by `main --mode`.

Why stages: a pod job usually runs one stage (`--mode=model`), the README demo runs them all
(`--mode=pipeline`), and every stage is idempotent: rerunning resumes or skips finished work and
never overwrites data or checkpoints.
"""
from __future__ import annotations

import json
import logging
import os

import jax

from mmjax import train


def build_data(config, workdir: str) -> dict:
    """Prepares every split of the dataset and the SentencePiece model (if the config has text)."""
    from mmjax.data import pipeline, text
    sizes = {split: len(pipeline.image_caption_dataset(config.data, split, workdir))
             for split in ("train", "validation", "test")}
    out = {"num_examples": sizes}
    if "model" in config:
        out["sp_model"] = text.ensure_text_tokenizer(config.data, workdir)
    logging.info("data ready: %s", out)
    return out


def _finished(summary: dict, stage: str) -> dict:
    if summary.get("preempted"):
        raise train.Preempted(f"{stage} stopped at step {summary['step']} (SIGTERM); its "
                              "checkpoint is saved: rerun the same command to resume")
    return summary


def train_tokenizer(config, workdir: str) -> dict:
    from mmjax.tasks.tokenizer_task import TokenizerTask, evaluate_tokenizer
    summary = _finished(train.train(config, workdir, TokenizerTask()), "tokenizer training")
    metrics = evaluate_tokenizer(config, workdir) if jax.process_index() == 0 else {}
    logging.info("tokenizer: %s", metrics)
    return {"step": summary["step"], **metrics}


def tokenize_images(config, workdir: str) -> dict:
    from mmjax.tasks import image_tokens
    return image_tokens.tokenize_all_splits(config, workdir)


def train_model(config, workdir: str) -> dict:
    from mmjax.tasks.multimodal_task import MultimodalTask
    summary = _finished(train.train(config, workdir, MultimodalTask()), "model training")
    return {"step": summary["step"], **summary.get("validation", {})}


def sample_and_evaluate(config, workdir: str) -> dict:
    from mmjax.tasks import multimodal_eval
    return multimodal_eval.run(config, workdir)


def run_mode(config, workdir: str, mode: str) -> dict:
    """Runs one stage, or for 'pipeline' every stage the config has blocks for."""
    has_model = "model" in config
    plan = {
        "data": [build_data],
        "tokenizer": [build_data, train_tokenizer],
        "tokenize": [tokenize_images],
        "model": [train_model],
        "sample": [sample_and_evaluate],
        "eval": [sample_and_evaluate],
        "pipeline": [build_data, train_tokenizer]
        + ([tokenize_images, train_model, sample_and_evaluate] if has_model else []),
    }[mode]
    if mode in ("tokenize", "model", "sample", "eval") and not has_model:
        raise ValueError(f"--mode={mode} needs a config with a `model` block "
                         "(e.g. configs/mot_shapes.py), not a tokenizer-only config")
    results = {}
    for stage in plan:
        results[stage.__name__] = stage(config, workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, f"results_{mode}.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results
