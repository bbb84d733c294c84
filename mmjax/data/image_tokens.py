"""Reading precomputed FSQ image tokens (written once by the tokenize stage, mmjax.stages.tokenize).

Record i of `<split>.array_record` holds the int32 FSQ indices (row-major over the token grid) of
record i of the image dataset; the JSON sidecar says which tokenizer produced them, so stale or
mismatched tokens are refused rather than silently used.
"""
from __future__ import annotations

import json

import grain
import numpy as np

from mmjax import io
from mmjax.errors import InputError, MissingArtifactError

SPLITS = ("train", "validation", "test")


def token_meta(workdir, split: str = "train") -> dict:
    """The sidecar of `split` (dataset, levels, grid, record count, tokenizer step)."""
    return io.read_json(workdir.image_token_files(split)[1])


def require_tokens(workdir, split: str) -> None:
    """MissingArtifactError naming the tokenize stage when `split` has no (complete) tokens."""
    data_path, meta_path = workdir.image_token_files(split)
    if not meta_path.exists() or not data_path.exists():
        raise MissingArtifactError(
            f"no image tokens for split {split!r} in {workdir.image_tokens}; run "
            "--mode=tokenize (or --mode=pipeline) first")


def load_tokens(workdir, split: str, expected_len: int) -> grain.MapDataset:
    """MapDataset of int32 index arrays for `split`; a clear error when missing or mismatched.

    `workdir`: a mmjax.workdir.Workdir (its `image_tokens` dir honours `fsq.tokens_dir`).
    """
    require_tokens(workdir, split)
    data_path, meta_path = workdir.image_token_files(split)
    meta = io.read_json(meta_path)
    if meta["num_records"] != expected_len:
        raise InputError(f"{meta_path}: {meta['num_records']} token records but the {split} "
                         f"split has {expected_len} images; the data changed since tokenization")
    # ArrayRecord reads local files only: a gs:// token file is copied to the local cache once
    # (keyed by its sidecar, which changes whenever the tokens do).
    source = grain.sources.ArrayRecordDataSource(io.local_copy(data_path, json.dumps(meta, sort_keys=True)))
    n = int(np.prod(meta["grid"]))

    def decode(raw: bytes) -> np.ndarray:
        row = np.frombuffer(raw, np.int32)
        if row.shape != (n,):
            raise InputError(f"{data_path}: a record has {row.size} tokens, expected {n}")
        return row

    return grain.MapDataset.source(source).map(decode)
