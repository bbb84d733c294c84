"""What the training benchmarks share: synthetic packed batches and a timed trainer step.

Why synthetic: step time depends on shapes and on the modality layout, not on what the tokens
say, so the benchmarks skip the tokenizer and data preparation. The rows still come from the
real packer (`mmjax.data.packing`) with the layout the task would produce: documents of
`data.max_caption_len` caption tokens (a random length between half and all of them) and
`(data.image_size / downsample)^2` FSQ image tokens, as many per row as the config's
`data.packing` puts there, directions drawn as the packer draws them (`objective.t2i_prob`,
stratified over `objective.direction_group_rows`). The train step is the trainer's own
(`train.build_setup`).
"""
from __future__ import annotations

import statistics
import time

import grain
import jax
import numpy as np

from mmjax import config_validation, parallel, train
from mmjax.data import packing
from mmjax.models import mot
from mmjax.stages.model import build_task
from mmjax.tasks.multimodal import MultimodalTask
from mmjax.tokenizers.fsq import FSQ
from mmjax.workdir import Workdir

SPECIAL = packing.SpecialIds(bos=1, eos=2, boi=3, eoi=4, uncond=5)
HEADS = ("targets", "rows", "all")  # where TimedTrainStep runs the heads


def image_tokens_per_image(config) -> int:
    """FSQ tokens per image: (image_size / the tokenizer's downsampling factor)^2."""
    return config_validation.image_side(config) ** 2


def synthetic_rows(config, num_rows: int, vocab_size: int, *, seed: int = 0,
                   third_modality_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """[num_rows, max_seq_len] packed rows (docs/INTERFACES.md) of random documents.

    third_modality_fraction: that share of the image tokens is relabelled modality 2 (for a
    3-modality MoT; they still embed through the image input projection), so the third
    modality's weights see work without changing the token layout or the FLOPs.
    """
    seq_len, max_caption = int(config.model.max_seq_len), int(config.data.max_caption_len)
    n_img = image_tokens_per_image(config)
    doc_len = packing.document_length(max_caption, n_img)
    if doc_len > seq_len:
        raise ValueError(f"a document ({doc_len} tokens) does not fit model.max_seq_len={seq_len}")
    fsq = FSQ(tuple(config.fsq.levels))
    rng = np.random.default_rng(seed)
    batch = (_first_fit_rows(config, num_rows, vocab_size, fsq, rng, seed)
             if config_validation.first_fit_packing(config)
             else _fixed_rows(config, num_rows, vocab_size, fsq, rng, seed))
    if third_modality_fraction > 0:
        image = np.argwhere(batch["modality"] == 1)
        pick = rng.random(len(image)) < third_modality_fraction
        batch["modality"][tuple(image[pick].T)] = 2
    return batch


def _caption(rng, vocab_size: int, max_caption: int) -> np.ndarray:
    """Random caption ids, between half and all of max_caption_len tokens long."""
    return rng.integers(5, vocab_size, size=int(rng.integers(max_caption // 2, max_caption + 1)))


def _first_fit_rows(config, num_rows: int, vocab_size: int, fsq, rng, seed: int) -> dict:
    """Rows of data.packing="first_fit": random examples through the real first-fit packer
    (as many as fill num_rows rows at the fewest documents per row)."""
    seq_len, max_caption = int(config.model.max_seq_len), int(config.data.max_caption_len)
    n_img = image_tokens_per_image(config)
    examples = []
    for _ in range(num_rows * (seq_len // packing.document_length(1, n_img))):
        caption = np.zeros(max_caption, np.int32)
        ids = _caption(rng, vocab_size, max_caption)
        caption[:len(ids)] = ids
        examples.append({"caption_ids": caption, "caption_len": np.int32(len(ids)),
                         "image_indices": rng.integers(0, fsq.codebook_size, n_img)})
    ds = packing.PackedDataset(
        grain.MapDataset.source(examples), seq_len=seq_len, special=SPECIAL,
        index_to_code=fsq.indices_to_codes, t2i_prob=float(config.objective.t2i_prob),
        caption_dropout=0.0, seed=seed, group_rows=config_validation.direction_group_rows(config),
        packing="first_fit", image_slots=config_validation.row_image_slots(config),
        lookahead=int(config.data.pack_lookahead))
    rows = [ds[r] for r in range(num_rows)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _fixed_rows(config, num_rows: int, vocab_size: int, fsq, rng, seed: int) -> dict:
    """Rows of data.packing="fixed": seq_len // (longest document) random documents each."""
    seq_len, max_caption = int(config.model.max_seq_len), int(config.data.max_caption_len)
    n_img = image_tokens_per_image(config)
    doc_len = packing.document_length(max_caption, n_img)
    per_row = seq_len // doc_len
    group_documents = config_validation.direction_group_rows(config) * per_row
    rows = []
    for r in range(num_rows):
        docs = []
        for j in range(per_row):
            caption = _caption(rng, vocab_size, max_caption)
            indices = rng.integers(0, fsq.codebook_size, size=n_img)
            direction, _ = packing.draw_direction(seed, r * per_row + j,
                                                  float(config.objective.t2i_prob), 0.0,
                                                  group_documents)
            docs.append(packing.build_document(caption, indices, fsq.indices_to_codes(indices),
                                               direction, SPECIAL))
        rows.append(packing.pack_documents(docs, seq_len, fsq.dim))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def workdir_rows(config, workdir: str, num_rows: int, *, block: int = 0) -> tuple[dict, int]:
    """([num_rows, max_seq_len] packed training rows of a finished workdir, its text vocab size).

    Why: the synthetic captions' lengths are drawn between half and all of
    `data.max_caption_len`, while the data's own captions can be much shorter (the demo's
    captions fill its 96-token rows to 73%, synthetic ones to 88%), and padding is what
    separates FLOPs executed from FLOPs counted on real tokens. These are the rows the model
    stage trains on: rows [block * num_rows, (block + 1) * num_rows) of its packed train set,
    whole direction groups when num_rows is a multiple of objective.direction_group_rows, as the
    trainer's batches are.
    """
    task = build_task(config, Workdir.from_config(config, workdir))
    ds = task.dataset("train", train=True)
    start = block * num_rows
    if start + num_rows > len(ds):
        raise ValueError(f"{workdir}: {len(ds)} packed train rows, fewer than block {block} of "
                         f"{num_rows} needs")
    rows = [ds[i] for i in range(start, start + num_rows)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]
             if np.asarray(rows[0][k]).dtype != object}
    return batch, task.model.vocab_size


def token_stats(batch) -> dict[str, float]:
    """Shares of the positions: real (non-padding) tokens, and positions whose next token is an
    image token (what `flops.flops_per_token`'s `image_fraction` means)."""
    seg, mod = batch["segment_ids"], batch["modality"]
    next_image = (mod[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return {"real_fraction": float(np.mean(seg > 0)),
            "image_fraction": float(next_image.sum() / seg.size),
            "modality_counts": np.bincount(mod[seg > 0].ravel()).tolist()}


def available_impls() -> tuple[str, ...]:
    """The concrete `model.mot_impl` choices ('auto' is an alias, left out)."""
    return tuple(i for i in mot.IMPLS if i != "auto")


def resolved_impl(impl: str, rows: int | None = None) -> str:
    """What `impl` runs as on this backend for a call of `rows` (B x T) positions."""
    return mot.resolve_impl(impl, rows)


def mesh_from_flag(spec: str, devices=None):
    """'data,fsdp,tensor' (e.g. '-1,1,1') -> a mesh over `devices` (default: all)."""
    sizes = [int(v) for v in spec.split(",")]
    if len(sizes) != 3:
        raise ValueError(f"--mesh={spec!r}: expected three sizes data,fsdp,tensor")
    import ml_collections
    return parallel.create_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, sizes))),
                                devices=devices)


class TimedTrainStep:
    """The trainer's jitted step on fixed batches, compiled and warmed up at construction.

    Each `time_one()` runs one step synchronised with block_until_ready (wall time per step with
    nothing overlapping, dispatch included). Several instances can be timed in alternation, so
    their ratios do not depend on load drifting over a long run.

    The step is compiled ahead of time (`lower().compile()`, the executable the timed calls run),
    so `executed_flops` is XLA's `cost_analysis()["flops"]` of exactly what is timed.
    `heads` (HEADS) says where the heads run: "targets" at the packer's target capacity (the
    objective's; image targets per direction group), "rows" at the one-row bound of each row
    (image slots for every document, the capacity before direction groups), "all" on every
    position, masked (the reference path, `capacity=None`): the older behaviours, kept for
    side-by-side benchmarks.
    """

    def __init__(self, config, vocab_size: int, batches: list[dict], mesh, warmup: int = 1,
                 heads: str = "targets"):
        if heads not in HEADS:
            raise ValueError(f"heads={heads!r}: choose from {HEADS}")
        task = MultimodalTask(config, vocab_size)  # the real model and loss, no data
        if heads == "all":
            task.capacity = None
        elif heads == "rows":
            if config_validation.first_fit_packing(config):
                raise ValueError("heads='rows' is the fixed packer's one-row bound; "
                                 "data.packing=first_fit rows have no fixed documents per row")
            row = config.copy_and_resolve_references()
            row.objective.t2i_prob, row.objective.direction_group_rows = 1.0, 1
            task.capacity = config_validation.target_capacity(row)
        self.capacity = task.capacity
        # the grouped-compute path these rows run (e.g. 'auto' -> 'buckets' or 'tiled')
        self.mot_impl = task.model.mot_impl_for(*np.shape(batches[0]["tokens"]))
        self.mesh = mesh
        self.setup = train.build_setup(task, batches[0], mesh, parallel.logical_rules())
        self._i = 0
        with jax.set_mesh(mesh):
            self.batches = [parallel.shard_batch(b, mesh) for b in batches]
            self.state = self.setup.init_fn(jax.random.PRNGKey(0))
            jax.block_until_ready(self.state)
            t0 = time.perf_counter()
            self._step = self.setup.train_step.lower(self.state, self.batches[0]).compile()
            cost = self._step.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            self.executed_flops = float(cost["flops"]) if cost and "flops" in cost else None
            self.compile_s = time.perf_counter() - t0 + self.time_one()  # as before: + 1st step
            for _ in range(max(warmup - 1, 0)):
                self.time_one()

    def time_one(self) -> float:
        batch = self.batches[self._i % len(self.batches)]
        self._i += 1
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            self.state, self.metrics = self._step(self.state, batch)
            jax.block_until_ready((self.state, self.metrics))
            return time.perf_counter() - t0

    @property
    def loss(self) -> float:
        return float(self.metrics["loss"])


def summarize(times: list[float]) -> dict:
    return {"step_s": statistics.median(times), "step_s_min": min(times), "step_times_s": times}


def time_train_steps(config, vocab_size: int, batches: list[dict], mesh, *, steps: int,
                     warmup: int = 1) -> dict:
    """Compiles + warms up the trainer's step, then times `steps` steps (see TimedTrainStep).

    Returns compile_s (first call, includes compilation), step_s (median), step_s_min,
    step_times_s, final_loss.
    """
    runner = TimedTrainStep(config, vocab_size, batches, mesh, warmup)
    times = [runner.time_one() for _ in range(steps)]
    return {"compile_s": runner.compile_s, **summarize(times), "final_loss": runner.loss}
