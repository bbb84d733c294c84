"""The tokenize stage: encode every image once with the trained FSQ tokenizer, store the indices.

Why precompute: the model stage then reads a few bytes per image instead of running the conv
encoder every step, and the tokens are exactly reproducible. The file layout and the reader are in
mmjax.data.image_tokens; existing token files are never overwritten (a mismatch is an error).

On N processes each encodes a contiguous share of the records into its own file
(`Workdir.image_token_shard`); after a barrier process 0 writes the sidecar that lists the files in
order, so reading them in order gives exactly the single-process record sequence.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax import checkpointing, image_codebook, io, multihost
from mmjax.data import pipeline
from mmjax.data.image_tokens import CONTENT_KEYS, SPLITS
from mmjax.errors import InputError
from mmjax.stages import tokenizer as tokenizer_stage
from mmjax.tokenizers import autoencoder as ae


def _expected_meta(config, num_records: int, grid: tuple[int, int], step: int) -> dict:
    meta = {"dataset": config.data.name, "image_size": int(config.data.image_size),
            "levels": [int(v) for v in config.fsq.levels], "grid": list(grid),
            "num_records": int(num_records), "tokenizer_step": int(step)}
    if image_codebook.is_learned(config):  # FSQ metas stay as they were
        meta.update(quantizer="vq", codebook_size=int(config.fsq.vq_codebook_size),
                    code_dim=int(config.fsq.vq_dim))
    return meta


def _existing(workdir, split: str, meta: dict) -> bool:
    """True when `split`'s tokens are complete and match `meta` (agreed by every process)."""
    meta_path = workdir.image_token_files(split)[1]
    found = meta_path.exists()
    seen = multihost.all_ok(found)
    if any(seen) and not all(seen):
        if not found:
            raise multihost.not_visible(meta_path, f"the {split} image tokens", "another process")
        blind = ", ".join(str(i) for i, s in enumerate(seen) if not s)
        raise multihost.PeerFailedError(f"tokenize: process(es) {blind} cannot see {meta_path} "
                                        "(their logs say where they looked)")
    if not found:
        return False
    stored = io.read_json(meta_path)
    if {k: stored.get(k) for k in CONTENT_KEYS if k in stored or k in meta} == meta:
        return True
    raise InputError(
        f"{meta_path} holds tokens from another tokenizer or dataset ({stored}); expected "
        f"{meta}. Refusing to overwrite: delete {workdir.image_tokens} or use a new workdir.")


def _write_records(path, rows) -> None:
    """Writes int32 rows as ArrayRecord records; `path` (local or gs://) appears only whole."""
    with io.local_file_for_writing(path) as local:  # riegeli writes local files only
        writer = ArrayRecordWriter(local, "group_size:1")
        for row in rows:
            writer.write(np.asarray(row, np.int32).tobytes())
        writer.close()


def local_encoder(model, params):
    """uint8 images [n, H, W, 3] -> int32 token indices [n, tokens], data-parallel over this
    process's devices.

    Why not one device: a process encodes its whole share of the records, and on a host of 8
    accelerators, or a CPU host split into one XLA device per core (mesh.cpu_devices), the first
    device alone leaves the rest idle (the demo's 16384 images: python -m bench.tokenize_stage).
    A batch that the device count does not divide is padded with blank images and trimmed.
    """
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("images",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("images"))
    params = jax.device_put(params, replicated)
    encode = jax.jit(lambda p, images: ae.tokenize(model, p, ae.images_to_float(images)),
                     in_shardings=(replicated, split), out_shardings=split)

    def run(images: np.ndarray) -> np.ndarray:
        pad = -len(images) % mesh.size
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        return np.asarray(encode(params, padded))[:len(images)]

    return run


def tokenize_split(config, workdir, split: str, model, params, step: int,
                   batch_size: int = 128) -> dict:
    """Writes the token files of one split (skips when identical ones exist)."""
    ds = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
    factor = model.downsample
    grid = (config.data.image_size // factor, config.data.image_size // factor)
    meta = _expected_meta(config, len(ds), grid, step)
    if _existing(workdir, split, meta):
        return meta
    pid, nproc = jax.process_index(), jax.process_count()
    files = [workdir.image_token_shard(split, i, nproc) for i in range(nproc)]
    start, stop = multihost.shard_range(len(ds), pid, nproc)
    encode = local_encoder(model, params)

    def rows():
        for lo in range(start, stop, batch_size):
            images = np.stack([ds[i]["image"] for i in range(lo, min(lo + batch_size, stop))])
            yield from np.asarray(encode(images), np.int32)

    def write_share():
        io.make_dirs(workdir.image_tokens)
        _write_records(files[pid], rows())

    multihost.together(f"tokenize {split}: encoding each process's share", write_share)
    sidecar = {**meta, "files": [f.name for f in files]}

    def finish():  # process 0, once every share is written: the sidecar marks the split complete
        multihost.require_visible(files, f"the {split} image token shards", "another process")
        io.write_json_atomic(workdir.image_token_files(split)[1], sidecar)
        return meta

    def visible():
        multihost.require_visible([workdir.image_token_files(split)[1], *files],
                                  f"the {split} image tokens")
        return meta

    multihost.run_once(f"tokenize {split}", finish, visible)
    logging.info("tokenized %s: %d images -> %s tokens each (%d file(s))", split, len(ds), grid,
                 len(files))
    return meta


def store_codebook(config, workdir, model, params) -> None:
    """A VQ tokenizer's learned codebook, stored once beside the tokens (mmjax.image_codebook)
    before any split's sidecar marks tokens complete; FSQ's grid needs no file."""
    if not image_codebook.is_learned(config):
        return
    table = np.asarray(ae.codebook_table(model, params))
    multihost.run_once(
        "tokenize: the VQ codebook", lambda: image_codebook.save(workdir, table),
        lambda: multihost.require_visible([workdir.image_token_codebook], "the VQ codebook"))


def run(config, workdir) -> dict:
    """Encodes every split with the trained tokenizer, each process its share of the records."""
    def load():
        model, params = tokenizer_stage.load_tokenizer(config, workdir)
        return model, params, checkpointing.latest_step(workdir.tokenizer_checkpoints)

    model, params, step = multihost.together("tokenize: loading the tokenizer", load)
    store_codebook(config, workdir, model, params)
    return {split: tokenize_split(config, workdir, split, model, params, step)
            for split in SPLITS}
