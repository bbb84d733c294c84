"""Workdir: the one place that names every artifact of a run, on local disk or in a bucket.

    <root>/data/                      datasets (TFDS ArrayRecord) and the SentencePiece model
    <root>/tokenizer/                 FSQ autoencoder run: checkpoints/, metrics, eval, PNG grid
    <root>/image_tokens/<split>.*     precomputed FSQ indices (+ a JSON sidecar)
    <root>/model/                     multimodal LM run: checkpoints/, metrics
    <root>/samples/                   sample-stage outputs (eval.json, captions, grids)
    <root>/results_<mode>.json        each CLI invocation's summary
    <root>/jax_cache/                 persistent XLA compilation cache of mmjax.main

Why an object: paths were spelled out in many files, so a layout change (or a gs:// root)
touched all of them. Config overrides (`data.data_dir`, `data.sp_model_path`,
`fsq.checkpoint_dir`, `fsq.tokens_dir`, used by sweeps to share one build) are resolved here
and nowhere else. Paths are `etils.epath.Path`s, so gs://bucket/run works for every stage.
"""
from __future__ import annotations

import dataclasses
import os

from etils import epath

from mmjax import io

# Datasets mmjax generates itself (mmjax/data/builders.py), into <root>/data by the data stage.
EMBEDDED_DATASETS = ("shapes", "digits", "natural", "shapes_edits")


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Artifact paths of one run. Build it with `Workdir.from_config(config, root)`."""

    root: epath.Path
    dataset: str = "shapes"
    sp_vocab_size: int = 256
    data_dir_override: str = ""
    sp_model_override: str = ""
    tokenizer_checkpoints_override: str = ""
    tokens_dir_override: str = ""

    @classmethod
    def from_config(cls, config, root) -> "Workdir":
        """Reads only the path-related fields of the config (blocks may be absent)."""
        data = config.get("data", {}) if hasattr(config, "get") else {}
        fsq = config.get("fsq", {}) if hasattr(config, "get") else {}
        return cls(root=io.as_path(root), dataset=str(data.get("name", "shapes")),
                   sp_vocab_size=int(data.get("sp_vocab_size", 256)),
                   data_dir_override=str(data.get("data_dir", "") or ""),
                   sp_model_override=str(data.get("sp_model_path", "") or ""),
                   tokenizer_checkpoints_override=str(fsq.get("checkpoint_dir", "") or ""),
                   tokens_dir_override=str(fsq.get("tokens_dir", "") or ""))

    # ---- data stage ------------------------------------------------------------------------
    @property
    def data_dir(self) -> epath.Path | None:
        """TFDS data dir: `data.data_dir`, else <root>/data for embedded sets, else None (TFDS's
        default data dir, for standard datasets prepared by the user)."""
        if self.data_dir_override:
            return io.as_path(self.data_dir_override)
        if self.dataset in EMBEDDED_DATASETS:
            return self.root / "data"
        return None

    @property
    def sp_model(self) -> epath.Path:
        """The SentencePiece model: `data.sp_model_path`, else the one the data stage trains."""
        if self.sp_model_override:
            return io.as_path(self.sp_model_override)
        name = self.dataset.replace("/", "_").replace(":", "_")
        return self.root / "data" / f"spm_{name}_{self.sp_vocab_size}.model"

    @property
    def sp_model_is_users(self) -> bool:
        return bool(self.sp_model_override)

    # ---- training runs -----------------------------------------------------------------------
    def run_dir(self, name: str) -> epath.Path:
        """A trainer task's directory (metrics, TensorBoard, checkpoints/): tokenizer or model."""
        return self.root / name

    def checkpoints(self, name: str) -> epath.Path:
        if name == "tokenizer" and self.tokenizer_checkpoints_override:
            return io.as_path(self.tokenizer_checkpoints_override)
        return self.run_dir(name) / "checkpoints"

    @property
    def tokenizer(self) -> epath.Path:
        return self.run_dir("tokenizer")

    @property
    def tokenizer_checkpoints(self) -> epath.Path:
        return self.checkpoints("tokenizer")

    @property
    def model(self) -> epath.Path:
        return self.run_dir("model")

    @property
    def model_checkpoints(self) -> epath.Path:
        return self.checkpoints("model")

    # ---- tokenize / sample stages --------------------------------------------------------------
    @property
    def image_tokens(self) -> epath.Path:
        """Precomputed FSQ tokens: `fsq.tokens_dir` (a sweep shares one set) or <root>/image_tokens."""
        if self.tokens_dir_override:
            return io.as_path(self.tokens_dir_override)
        return self.root / "image_tokens"

    def image_token_files(self, split: str) -> tuple[epath.Path, epath.Path]:
        """(<split>.array_record, <split>.json) of the precomputed tokens."""
        return (self.image_tokens / f"{split}.array_record", self.image_tokens / f"{split}.json")

    def image_token_shard(self, split: str, index: int, count: int) -> epath.Path:
        """Process `index`'s share of `split`'s tokens when `count` processes tokenize it
        (count 1: <split>.array_record itself). The sidecar lists the files, in record order."""
        if count == 1:
            return self.image_token_files(split)[0]
        return self.image_tokens / f"{split}-{index:05d}-of-{count:05d}.array_record"

    @property
    def samples(self) -> epath.Path:
        return self.root / "samples"

    def results(self, mode: str) -> epath.Path:
        return self.root / f"results_{mode}.json"

    @property
    def compilation_cache(self) -> epath.Path:
        """JAX's persistent compilation cache (`train.compilation_cache_dir` overrides it)."""
        return self.root / "jax_cache"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __str__(self) -> str:
        return os.fspath(self.root)
