"""Which codebook the image tokens index: FSQ's fixed grid, or a VQ tokenizer's learned table.

Why one home: the packer (index -> code vector for the model's input), the sampler (nearest code
to a flow sample, index of a code) and the API all need the map between an image token's index
and its code vector. For FSQ it follows from `fsq.levels`; for VQ it is the codebook the
tokenizer learned, which the tokenize stage stores beside the indices it wrote
(`Workdir.image_token_codebook`), so tokens and the table they refer to are one artifact: the
model stage never needs the tokenizer checkpoint, and a retrained tokenizer cannot silently pair
old indices with a new table (the tokenize stage refuses to overwrite either).

Both kinds have one interface (`dim`, `codebook_size`, `levels`, `codebook()`, `snap`,
`codes_to_indices`, `indices_to_codes`): `mmjax.tokenizers.fsq.FSQ` and
`mmjax.tokenizers.vq.LearnedCodebook`.
"""
from __future__ import annotations

import io as _bytes_io

import numpy as np

from mmjax import io
from mmjax.errors import InputError, MissingArtifactError
from mmjax.tokenizers.fsq import FSQ
from mmjax.tokenizers.vq import LearnedCodebook


def is_learned(config) -> bool:
    """True when the config's tokenizer learns its codebook (fsq.quantizer='vq')."""
    return config.fsq.get("quantizer", "fsq") == "vq"


def expected_shape(config) -> tuple[int, int]:
    """[K, d] of a VQ config's stored codebook (fsq.vq_codebook_size, fsq.vq_dim)."""
    return int(config.fsq.vq_codebook_size), int(config.fsq.vq_dim)


def encode_table(table) -> bytes:
    """float32 [K, d] as .npy bytes (what `save` writes)."""
    buffer = _bytes_io.BytesIO()
    np.save(buffer, np.asarray(table, np.float32), allow_pickle=False)
    return buffer.getvalue()


def read_table(path) -> np.ndarray:
    """The table stored at `path` (local or gs://)."""
    return np.load(_bytes_io.BytesIO(io.as_path(path).read_bytes()), allow_pickle=False)


def save(workdir, table) -> None:
    """Stores a VQ codebook beside the tokens; an existing different one is never overwritten."""
    path = workdir.image_token_codebook
    table = np.asarray(table, np.float32)
    if path.exists():
        stored = read_table(path)
        if stored.shape == table.shape and np.array_equal(stored, table):
            return
        raise InputError(f"{path} holds another tokenizer's codebook (shape {stored.shape}); "
                         f"refusing to overwrite: delete {workdir.image_tokens} or use a new "
                         "workdir")
    io.make_dirs(workdir.image_tokens)
    io.write_bytes_atomic(path, encode_table(table))


def load(config, workdir):
    """The image tokens' codebook: FSQ(fsq.levels), or the stored VQ table (checked against
    fsq.vq_codebook_size and fsq.vq_dim), with one clear error when it is missing or differs."""
    if not is_learned(config):
        return FSQ(tuple(int(v) for v in config.fsq.levels))
    path = workdir.image_token_codebook
    if not path.exists():
        raise MissingArtifactError(f"no VQ codebook at {path}; run --mode=tokenize (or "
                                   "--mode=pipeline) first")
    table = read_table(path)
    if table.shape != expected_shape(config):
        raise InputError(f"{path}: codebook of shape {table.shape}, but config.fsq.vq_codebook_size"
                         f" and config.fsq.vq_dim say {expected_shape(config)}")
    return LearnedCodebook(table)
