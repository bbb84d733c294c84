"""The tokenize stage: encode every image once with the trained FSQ tokenizer, store the indices.

Why precompute: the model stage then reads a few bytes per image instead of running the conv
encoder every step, and the tokens are exactly reproducible. The file layout and the reader are in
mmjax.data.image_tokens; existing token files are never overwritten (a mismatch is an error).
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mmjax import checkpointing, io
from mmjax.data import pipeline
from mmjax.data.image_tokens import SPLITS
from mmjax.errors import InputError
from mmjax.stages import tokenizer as tokenizer_stage
from mmjax.tokenizers import autoencoder as ae


def _expected_meta(config, num_records: int, grid: tuple[int, int], step: int) -> dict:
    return {"dataset": config.data.name, "image_size": int(config.data.image_size),
            "levels": [int(v) for v in config.fsq.levels], "grid": list(grid),
            "num_records": int(num_records), "tokenizer_step": int(step)}


def tokenize_split(config, workdir, split: str, model, params, step: int,
                   batch_size: int = 128) -> dict:
    """Writes the token file of one split (skips when an identical one exists)."""
    ds = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
    factor = model.downsample
    grid = (config.data.image_size // factor, config.data.image_size // factor)
    meta = _expected_meta(config, len(ds), grid, step)
    data_path, meta_path = workdir.image_token_files(split)
    if meta_path.exists():
        found = io.read_json(meta_path)
        if found == meta:
            return meta
        raise InputError(
            f"{meta_path} holds tokens from another tokenizer or dataset ({found}); expected "
            f"{meta}. Refusing to overwrite: delete {workdir.image_tokens} or use a new workdir.")
    io.make_dirs(workdir.image_tokens)
    encode = jax.jit(lambda imgs: ae.tokenize(model, params, ae.images_to_float(imgs)))
    with io.local_file_for_writing(data_path) as local:  # riegeli writes local files only
        writer = ArrayRecordWriter(local, "group_size:1")
        for start in range(0, len(ds), batch_size):
            idx = range(start, min(start + batch_size, len(ds)))
            images = np.stack([ds[i]["image"] for i in idx])
            for row in np.asarray(encode(images), np.int32):
                writer.write(row.tobytes())
        writer.close()
    io.write_json_atomic(meta_path, meta)  # the sidecar last: it marks the split complete
    logging.info("tokenized %s: %d images -> %s tokens each", split, len(ds), grid)
    return meta


def run(config, workdir) -> dict:
    """Encodes every split with the trained tokenizer (process 0 writes, others wait)."""
    out = {}
    if jax.process_index() == 0:
        model, params = tokenizer_stage.load_tokenizer(config, workdir)
        step = checkpointing.latest_step(workdir.tokenizer_checkpoints)
        for split in SPLITS:
            out[split] = tokenize_split(config, workdir, split, model, params, step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("image_tokens_written")
    return out
