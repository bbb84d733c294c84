"""Precomputed FSQ image tokens: encode every image once, store indices in array_record files.

Why precompute: the model stage then reads a few bytes per image instead of running the conv
encoder every step, and the tokens are exactly reproducible. Record i of `<split>.array_record`
holds the int32 FSQ indices (row-major over the token grid) of record i of the image dataset; a
JSON sidecar says which tokenizer produced them, so stale or mismatched tokens are refused rather
than silently used. Existing token files are never overwritten.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np

from mmjax.data import pipeline

SPLITS = ("train", "validation", "test")


def tokens_dir(workdir: str, config=None) -> str:
    """`fsq.tokens_dir` when set (a sweep shares one set of tokens), else <workdir>/image_tokens."""
    override = config.fsq.get("tokens_dir", "") if config is not None and "fsq" in config else ""
    return os.fspath(override) if override else os.path.join(workdir, "image_tokens")


def _paths(workdir: str, split: str, config=None) -> tuple[str, str]:
    base = os.path.join(tokens_dir(workdir, config), split)
    return base + ".array_record", base + ".json"


def _expected_meta(config, num_records: int, grid: tuple[int, int], step: int) -> dict:
    meta = {"dataset": config.data.name, "image_size": int(config.data.image_size),
            "levels": [int(v) for v in config.fsq.levels], "grid": list(grid),
            "num_records": int(num_records), "tokenizer_step": int(step)}
    if config.fsq.get("quantizer", "fsq") == "vq":  # FSQ metas stay as they were
        meta.update(quantizer="vq", codebook_size=int(config.fsq.vq_codebook_size),
                    code_dim=int(config.fsq.vq_dim))
    return meta


def tokenize_split(config, workdir: str, split: str, model, params, step: int,
                   batch_size: int = 128) -> dict:
    """Writes the token file of one split (skips when an identical one exists)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from mmjax.tokenizers import autoencoder as ae

    ds = pipeline.image_caption_dataset(config.data, split, workdir)
    factor = model.downsample
    grid = (config.data.image_size // factor, config.data.image_size // factor)
    meta = _expected_meta(config, len(ds), grid, step)
    data_path, meta_path = _paths(workdir, split, config)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            found = json.load(f)
        if found == meta:
            return meta
        raise ValueError(
            f"{meta_path} holds tokens from another tokenizer or dataset ({found}); expected "
            f"{meta}. Refusing to overwrite: delete {tokens_dir(workdir, config)} or use a new "
            "workdir.")
    os.makedirs(tokens_dir(workdir, config), exist_ok=True)
    encode = jax.jit(lambda imgs: ae.tokenize(model, params, ae.images_to_float(imgs)))
    tmp = data_path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        images = np.stack([ds[i]["image"] for i in idx])
        for row in np.asarray(encode(images), np.int32):
            writer.write(row.tobytes())
    writer.close()
    os.replace(tmp, data_path)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    logging.info("tokenized %s: %d images -> %s tokens each", split, len(ds), grid)
    return meta


def tokenize_all_splits(config, workdir: str) -> dict:
    """Encodes every split with the trained tokenizer (process 0 writes, others wait)."""
    from mmjax import checkpointing
    from mmjax.tasks.tokenizer_task import checkpoint_dir, load_tokenizer
    out = {}
    if jax.process_index() == 0:
        model, params = load_tokenizer(config, workdir)
        step = checkpointing.latest_step(checkpoint_dir(config, workdir))
        for split in SPLITS:
            out[split] = tokenize_split(config, workdir, split, model, params, step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("image_tokens_written")
    return out


def load_tokens(workdir: str, split: str, expected_len: int, config=None) -> grain.MapDataset:
    """MapDataset of int32 index arrays for `split`; a clear error when missing or mismatched."""
    data_path, meta_path = _paths(workdir, split, config)
    if not os.path.exists(meta_path) or not os.path.exists(data_path):
        raise FileNotFoundError(
            f"no image tokens for split {split!r} in {tokens_dir(workdir, config)}; run "
            "--mode=tokenize (or --mode=pipeline) first")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["num_records"] != expected_len:
        raise ValueError(f"{meta_path}: {meta['num_records']} token records but the {split} split "
                         f"has {expected_len} images; the data changed since tokenization")
    source = grain.sources.ArrayRecordDataSource(data_path)
    n = int(np.prod(meta["grid"]))

    def decode(raw: bytes) -> np.ndarray:
        row = np.frombuffer(raw, np.int32)
        if row.shape != (n,):
            raise ValueError(f"{data_path}: a record has {row.size} tokens, expected {n}")
        return row

    return grain.MapDataset.source(source).map(decode)


def token_meta(workdir: str, split: str = "train", config=None) -> dict:
    with open(_paths(workdir, split, config)[1]) as f:
        return json.load(f)
