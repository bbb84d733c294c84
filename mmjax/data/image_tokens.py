"""Reading precomputed FSQ image tokens (written once by the tokenize stage, mmjax.stages.tokenize).

Record i of `<split>.array_record` holds the int32 FSQ indices (row-major over the token grid) of
record i of the image dataset; the JSON sidecar says which tokenizer produced them, so stale or
mismatched tokens are refused rather than silently used. A split tokenized by N processes is N
files (`<split>-00000-of-0000N.array_record`, ...), listed in record order under the sidecar's
`files`; read in that order they are the single file's records. A sidecar without `files` (older
runs) means `<split>.array_record`.
"""
from __future__ import annotations

import json

import grain
import numpy as np

from mmjax import io
from mmjax.data.contract import SPLITS
from mmjax.errors import InputError, MissingArtifactError

# The sidecar fields that say what the tokens are (`files` only says where they are stored).
# A VQ tokenizer's tokens add "quantizer", "codebook_size" and "code_dim" (FSQ sidecars omit them).
CONTENT_KEYS = ("dataset", "image_size", "levels", "grid", "num_records", "tokenizer_step",
                "quantizer", "codebook_size", "code_dim")


def token_meta(workdir, split: str = "train") -> dict:
    """The sidecar of `split` (dataset, levels, grid, record count, tokenizer step)."""
    return io.read_json(workdir.image_token_files(split)[1])


def token_files(workdir, split: str, meta: dict) -> list:
    """The token files of `split`, in record order (from the sidecar `meta`)."""
    names = meta.get("files") or [workdir.image_token_files(split)[0].name]
    return [workdir.image_tokens / name for name in names]


def require_tokens(workdir, split: str) -> None:
    """MissingArtifactError naming the tokenize stage when `split` has no (complete) tokens."""
    meta_path = workdir.image_token_files(split)[1]
    missing = not meta_path.exists() or not all(
        f.exists() for f in token_files(workdir, split, io.read_json(meta_path)))
    if missing:
        raise MissingArtifactError(
            f"no image tokens for split {split!r} in {workdir.image_tokens}; run "
            "--mode=tokenize (or --mode=pipeline) first")


def load_tokens(workdir, split: str, expected_len: int) -> grain.MapDataset:
    """MapDataset of int32 index arrays for `split`; a clear error when missing or mismatched.

    `workdir`: a mmjax.workdir.Workdir (its `image_tokens` dir honours `fsq.tokens_dir`).
    """
    require_tokens(workdir, split)
    meta_path = workdir.image_token_files(split)[1]
    meta = io.read_json(meta_path)
    files = token_files(workdir, split, meta)
    if meta["num_records"] != expected_len:
        raise InputError(f"{meta_path}: {meta['num_records']} token records but the {split} "
                         f"split has {expected_len} images; the data changed since tokenization")
    # ArrayRecord reads local files only: a gs:// token file is copied to the local cache once
    # (keyed by its sidecar, which changes whenever the tokens do).
    key = json.dumps(meta, sort_keys=True)
    source = grain.sources.ArrayRecordDataSource([io.local_copy(f, key) for f in files])
    if len(source) != meta["num_records"]:
        raise InputError(f"{workdir.image_tokens}: the {split} token files hold {len(source)} "
                         f"records, the sidecar {meta_path} says {meta['num_records']}")
    n = int(np.prod(meta["grid"]))

    def decode(raw: bytes) -> np.ndarray:
        row = np.frombuffer(raw, np.int32)
        if row.shape != (n,):
            raise InputError(f"{workdir.image_tokens}/{split}*: a record has {row.size} tokens, "
                             f"expected {n}")
        return row

    return grain.MapDataset.source(source).map(decode)
