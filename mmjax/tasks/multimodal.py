"""The text <-> image Mixture-of-Transformers as a trainer task.

Data: (image, caption) records + precomputed FSQ tokens -> tokenized examples -> packed rows
(mmjax.data.packing). Each example appears `objective.direction_redraws` times per pass with an
independently drawn direction (text->image or image->caption) and caption dropout, so every image
is both generated and captioned over training while rows stay random-access (exactly resumable).
Captions longer than `data.max_caption_len` follow `data.long_captions` (mmjax.data.captions).
"""
from __future__ import annotations

import functools
import json
import logging

import grain
import ml_collections
import numpy as np

from mmjax import config_validation, flops, image_codebook, objectives
from mmjax import targets as targets_lib
from mmjax.data import captions, image_tokens, packing, pipeline
from mmjax.models import model as model_lib


FLOPS_SAMPLE_ROWS = 16  # packed rows that measure the image-target share for the FLOPs count


def build_model(config, vocab_size: int) -> model_lib.MultimodalLM:
    """MultimodalLM of the config's checked ModelConfig (model block + vocab + fsq.levels)."""
    return model_lib.MultimodalLM(config_validation.model_config(config, int(vocab_size)))


def long_caption_policy(config) -> str:
    return str(config.data.get("long_captions", "truncate"))


def encode_caption(tokenizer, caption: str, max_len: int,
                   policy: str = "error") -> tuple[np.ndarray, int]:
    """Caption ids padded to `max_len`; too long ones follow `policy` (drop is an error here:
    dropping happens when the split is scanned, see tokenized_examples)."""
    ids, _ = captions.fit_caption(tokenizer, caption, max_len,
                                  "error" if policy == "drop" else policy)
    out = np.zeros(max_len, np.int32)
    out[: len(ids)] = ids
    return out, len(ids)


def tokenized_examples(config, workdir, tokenizer, split: str) -> grain.MapDataset:
    """{caption_ids, caption_len, image_indices} per kept record of `split` (data.long_captions;
    records and tokens must exist: the data and tokenize stages wrote them). The caption ids are
    the ones the split's scan fitted (captions.FittedCaptions): no record is read here."""
    records = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
    tokens = image_tokens.load_tokens(workdir, split, len(records))
    max_len = int(config.data.max_caption_len)
    found = _scan(config, workdir, tokenizer, split, max_len, long_caption_policy(config))

    def make(j: int) -> dict:
        ids = found.fitted[j]
        padded = np.zeros(max_len, np.int32)
        padded[:len(ids)] = ids
        return {"caption_ids": padded, "caption_len": np.int32(len(ids)),
                "image_indices": tokens[int(found.kept[j])]}

    return grain.MapDataset.range(len(found.kept)).map(make)


@functools.lru_cache(maxsize=16)
def _scan_cached(data_json: str, data_dir: str, split: str, tokenizer, max_len: int,
                 policy: str):
    data_cfg = ml_collections.ConfigDict(json.loads(data_json))
    data_dir = data_dir or None
    return captions.scan(tokenizer, pipeline.caption_dataset(data_cfg, split, data_dir),
                         max_len, policy, split)


def _scan(config, workdir, tokenizer, split, max_len, policy):
    """`split`'s caption scan (kept records, their fitted ids, counts), once per process."""
    data_dir = workdir.data_dir
    return _scan_cached(config.data.to_json(), "" if data_dir is None else str(data_dir), split,
                        tokenizer, max_len, policy)


def caption_counts(config, workdir, tokenizer, split: str) -> dict:
    """How many captions of `split` are too long, truncated or dropped (logged at training start)."""
    return _scan(config, workdir, tokenizer, split, int(config.data.max_caption_len),
                 long_caption_policy(config)).counts


def packed_dataset(config, workdir, tokenizer, split: str, *, train: bool) -> grain.MapDataset:
    """Packed rows (docs/INTERFACES.md) of `split`; training redraws each example's direction."""
    if config.data.name == "shapes_edits":  # multi-image edit documents instead of pairs
        from mmjax.tasks import edits
        return edits.packed_dataset(config, workdir, tokenizer, split, train=train)
    examples = tokenized_examples(config, workdir, tokenizer, split)
    redraws = int(config.objective.direction_redraws) if train else 1
    n = len(examples)
    order = grain.MapDataset.range(n * redraws)
    if train:  # a direction group (and so a shuffled block) never holds a sorted set's neighbours
        order = order.shuffle(seed=int(config.data.seed))
    parent = order.map(lambda i: examples[i % n])
    obj = config.objective
    packing_kw = {}
    if config_validation.first_fit_packing(config):  # plans from the scan's lengths, not records
        found = _scan(config, workdir, tokenizer, split, int(config.data.max_caption_len),
                      long_caption_policy(config))
        lengths = np.array([len(ids) for ids in found.fitted], np.int64)
        packing_kw = dict(packing="first_fit", image_slots=config_validation.row_image_slots(config),
                          lookahead=int(config.data.pack_lookahead),
                          caption_lengths=lengths[np.array([order[i] for i in range(len(order))]) % n])
    return packing.PackedDataset(
        parent, seq_len=int(config.model.max_seq_len), special=packing.special_ids(tokenizer),
        # The lookup, not the table: an FSQ grid of 2^24+ codes (4x4-token images want wide codes)
        # does not fit in memory as [codebook_size, dim].
        index_to_code=image_codebook.load(config, workdir).indices_to_codes,
        t2i_prob=float(obj.t2i_prob), caption_dropout=float(obj.caption_dropout) if train else 0.0,
        seed=int(config.data.seed) + (0 if train else 1),
        t2i_caption_loss=bool(obj.t2i_caption_loss),
        group_rows=config_validation.direction_group_rows(config), **packing_kw)


class MultimodalTask:
    """Trains MultimodalLM on packed text/image sequences with the `train` block.

    Built once: `MultimodalTask(config, vocab_size)` has the model and the loss (benchmarks use
    it so); `data=(workdir, text tokenizer)` adds the packed datasets the trainer reads.
    """

    name = "model"

    def __init__(self, config, vocab_size: int, data: tuple | None = None):
        self.config = config
        self.train_config = config.train
        self.model = build_model(config, vocab_size)
        self.objective = config_validation.objective_config(config.objective)
        # The heads run only at target positions, gathered to this static capacity per row
        # (mmjax/targets.py); None runs them at every position (the masked reference path).
        self.capacity = config_validation.target_capacity(config)
        self._data = data
        self.caption_counts: dict[str, dict] = {}  # per split: too long / truncated / dropped
        if data is not None:
            workdir, tokenizer = data
            for split in ("train", "validation"):
                self.caption_counts[split] = caption_counts(config, workdir, tokenizer, split)
            logging.info("captions (data.long_captions=%s, max %d tokens): %s",
                         long_caption_policy(config), int(config.data.max_caption_len),
                         self.caption_counts)

    def count_tokens(self, batch) -> int:
        """Real (non-padding) positions of a host batch: what tokens/s and MFU count."""
        return int(np.sum(np.asarray(batch["segment_ids"]) > 0))

    @functools.cached_property
    def flops_per_token(self) -> float | None:
        """Analytic training FLOPs per real token (mmjax.flops), with the shares of positions that
        have an image target and a text target measured on the first packed training rows."""
        if self._data is None:
            return None
        ds = self.dataset("train", train=True)
        rows = [ds[i] for i in range(min(FLOPS_SAMPLE_ROWS, len(ds)))]
        real = sum(float(np.sum(r["segment_ids"] > 0)) for r in rows)
        image_fraction = sum(float(np.sum(r["image_mask"])) for r in rows) / max(real, 1.0)
        text_fraction = sum(float(np.sum(r["text_mask"])) for r in rows) / max(real, 1.0)
        image_fraction = min(image_fraction, 1.0)
        return float(flops.flops_per_token(self.model.cfg, int(self.config.model.max_seq_len),
                                           image_fraction,
                                           text_fraction=min(text_fraction, 1.0 - image_fraction)
                                           )["train"])

    def dataset(self, split: str, *, train: bool):
        if self._data is None:
            raise RuntimeError("this MultimodalTask was built without data=(workdir, tokenizer)")
        workdir, tokenizer = self._data
        ds = packed_dataset(self.config, workdir, tokenizer, split, train=train)
        if ds.fill:
            logging.info("%s rows (data.packing=first_fit, %d image slots per row): %.1f%% real "
                         "tokens, %.2f documents per row; the fixed packer would hold %.1f%%",
                         split, ds.image_capacity, 100 * ds.fill["real_fraction"],
                         ds.fill["documents_per_row"], 100 * ds.fill["fixed_real_fraction"])
        image, text = ds.target_capacity
        if image > self.capacity.image or text > self.capacity.text \
                or ds.group_rows != self.capacity.group:  # a layout the config misreads
            raise config_validation.ConfigError(
                f"packed {split} rows hold up to {image} image targets per {ds.group_rows} rows "
                f"and {text} text targets per row, more than the heads' capacity "
                f"{self.capacity} from the config ({targets_lib.CAPACITY_FIELDS})")
        if self.model.cfg.image_capacity and (
                ds.image_capacity > self.model.cfg.image_capacity
                or ds.bucket_rows != self.model.cfg.bucket_rows):
            raise config_validation.ConfigError(
                f"packed {split} rows hold up to {ds.image_capacity} image tokens per row over "
                f"{ds.bucket_rows} row(s), more than the MoT buckets' "
                f"{self.model.cfg.image_capacity} over {self.model.cfg.bucket_rows} from the config "
                f"({targets_lib.CAPACITY_FIELDS})")
        return ds

    def init_params(self, rng, batch):
        return model_lib.init_params(self.model, rng, batch)

    def loss_fn(self, params, batch, rng, train):
        return objectives.compute_losses(self.model, params, batch, rng, self.objective,
                                         train=train, capacity=self.capacity)
