"""Checks a config before anything runs, so a bad value fails in one line naming the field, and
builds the frozen typed blocks the code below reads.

Why up front: a negative step count or an odd head dimension otherwise surfaces minutes later as
a shape error deep inside jit, or worse, as a silently wrong run. Why here only: each rule has
this one home. The model, the objective, the sampler and the FLOPs counts take the typed blocks
built below (`model_config`, `objective_config`, `target_capacity`, `sample_settings`) and do not check them again;
they check only what they alone can see at run time (batch shapes, modality ids, cache overflow).
Choice lists come from mmjax.choices; the FSQ-levels rule is the public `FSQ` class's own
(`fsq.levels_problem`, so FSQ stays usable standalone), called here rather than written twice.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections

from mmjax import image_heads
from mmjax.choices import CHOICES
from mmjax.data import contract, first_fit, packing
from mmjax.errors import InputError
from mmjax.models.config import ModelConfig
from mmjax.objectives import ObjectiveConfig
from mmjax.sampling import SampleSettings
from mmjax.targets import TargetCapacity
from mmjax.tokenizers import fsq
from mmjax.tokenizers.autoencoder import DOWNSAMPLE_RULE, downsample_factor


class ConfigError(InputError):
    """A config field holds a value mmjax cannot run with."""


def _get(config, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _get_or(config, path: str, default: Any = None) -> Any:
    """`path`'s value, or `default` where its block or field is absent."""
    try:
        return _get(config, path)
    except (KeyError, AttributeError):
        return default


def _require(config, path: str, ok: Callable[[Any], bool], what: str) -> None:
    missing = object()
    value = _get_or(config, path, missing)
    if value is missing:
        return  # block absent from this config (e.g. no model block in a tokenizer config)
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good:
        raise ConfigError(f"config.{path}={value!r}: {what}")


def _pos(config, paths: Iterable[str]) -> None:
    for p in paths:
        _require(config, p, lambda v: int(v) == v and v > 0, "must be a positive integer")


def _nonneg(config, paths: Iterable[str]) -> None:
    for p in paths:
        _require(config, p, lambda v: v >= 0, "must be >= 0")


def _one_of(config, path: str, kind: str | None = None) -> None:
    """`path`'s value is in CHOICES[kind or path] (kind: e.g. "train.nan_policy" for any
    train-like block)."""
    choices = CHOICES[kind or path]
    _require(config, path, lambda v: v in choices, f"must be one of {', '.join(choices)}")


def _fsq_levels_error(levels) -> str | None:
    """Why `levels` cannot make an FSQ quantizer (fsq.levels_problem: the rule's one home)."""
    return fsq.levels_problem(levels)


def validate_train_block(config, block: str) -> None:
    _pos(config, [f"{block}.{f}" for f in ("steps", "batch_size", "grad_accum", "checkpoint_every",
                                           "keep_checkpoints", "log_every", "eval_batches")])
    _nonneg(config, [f"{block}.{f}" for f in ("warmup_steps", "weight_decay", "grad_clip",
                                              "eval_every")])
    _require(config, f"{block}.lr", lambda v: v > 0, "must be > 0")
    _require(config, f"{block}.end_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    for b in ("b1", "b2"):
        _require(config, f"{block}.{b}", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _one_of(config, f"{block}.nan_policy", "train.nan_policy")
    _require(config, f"{block}.ema_decay", lambda v: 0 <= v < 1, "must be in [0, 1) (0 = no EMA)")
    _nonneg(config, [f"{block}.peak_tflops"])
    _require(config, f"{block}.profile_steps",
             lambda v: len(v) == 0 or (len(v) == 2 and 0 <= int(v[0]) < int(v[1])),
             "must be () or (start, stop) with 0 <= start < stop")


def _validate_vq(config) -> None:
    """The fsq.quantizer switch and the fsq.vq_* fields (mmjax.tokenizers.vq)."""
    _one_of(config, "fsq.quantizer")
    _require(config, "fsq.vq_codebook_size", lambda v: int(v) == v and 2 <= v < 2**31,
             "must be an integer in [2, 2^31) (int32 indices)")
    _pos(config, ["fsq.vq_dim"])
    _nonneg(config, ["fsq.vq_beta"])
    _require(config, "fsq.vq_ema_decay", lambda v: 0 <= v < 1,
             "must be in [0, 1) (0 = codebook learned by gradient)")
    _require(config, "fsq.vq_reseed", lambda v: int(v) == v and v >= 0,
             "must be an integer >= 0 (steps unused before a code is reseeded; 0 = off)")
    _require(config, "fsq.vq_reseed",
             lambda v: v == 0 or _get(config, "fsq.vq_ema_decay") > 0,
             "needs fsq.vq_ema_decay > 0 (reseeding rewrites the EMA codebook)")
    if "model" in config and _get(config, "fsq.quantizer") == "vq":
        _require(config, "model.discrete_factorized", lambda v: not v,
                 "needs FSQ tokens (fsq.quantizer='fsq'): a VQ index has no per-channel digits")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first bad field; returns the config unchanged."""
    missing = [block for block in ("data", "mesh") if block not in config]
    if missing:  # e.g. a sweep config (configs/sweep_scaling.py) given to mmjax.main
        raise ConfigError(
            f"config has no {' or '.join(missing)} block (top-level fields: {sorted(config)}); "
            "is it a config for another entry point?")
    _require(config, "data.name", lambda v: isinstance(v, str) and v, "must name a dataset")
    _pos(config, ["data.image_size", "data.num_train", "data.num_validation", "data.num_test",
                  "data.max_objects", "data.sp_vocab_size", "data.read_threads",
                  "data.max_caption_len", "data.sp_max_sentences"])
    _nonneg(config, ["data.worker_count"])
    _require(config, "data.image_size", lambda v: v >= contract.MIN_IMAGE_SIZE,
             f"must be at least {contract.MIN_IMAGE_SIZE} pixels")
    _require(config, "data.max_objects", lambda v: v <= 9, "at most 9 (one shape per 3x3 cell)")
    if "eval" in config:
        _pos(config, ["eval.fid_batch_size", "eval.kid_subset_size"])
        _require(config, "eval.inception_weights", lambda v: not v or os.path.isfile(os.fspath(v)),
                 "does not exist (an .npz of pytorch-fid's InceptionV3 weights, or '' for no FID)")
    if "long_captions" in config.data:
        _one_of(config, "data.long_captions")
    if "packing" in config.data:
        _one_of(config, "data.packing")
        _nonneg(config, ["data.row_image_slots", "data.pack_lookahead"])
        _require(config, "data.packing", lambda v: v == "fixed" or config.data.name != "shapes_edits",
                 "must be 'fixed' for edit documents (data.name='shapes_edits')")
    levels_error = _fsq_levels_error(_get(config, "fsq.levels")) if "fsq" in config else None
    if levels_error:
        raise ConfigError(f"config.fsq.levels={_get(config, 'fsq.levels')!r}: {levels_error}")
    _require(config, "fsq.channels", lambda v: len(v) > 0 and all(c > 0 for c in v),
             "needs at least one positive width")
    _require(config, "fsq.patch_size", lambda v: int(v) == v and v >= 1,
             "must be a positive integer (pixels per side folded into channels)")
    _require(config, "data.image_size",
             lambda v: v % _downsample_factor(config) == 0 if "fsq" in config else True,
             f"must be divisible by the FSQ downsampling factor {DOWNSAMPLE_RULE}")
    _nonneg(config, ["fsq.num_res_blocks", "fsq.l1_weight"])
    _require(config, "fsq.norm_groups",
             lambda v: int(v) == v and v >= 1 and all(c % v == 0 for c in _get(config, "fsq.channels")),
             "must be a positive integer dividing every width in fsq.channels (GroupNorm groups)")
    _one_of(config, "fsq.loss")
    _validate_vq(config)
    _validate_model(config)
    _validate_objective(config)
    for block in ("train", "tokenizer_train"):
        validate_train_block(config, block)
    _validate_sample(config)
    groups = direction_group_rows(config)
    _require(config, "train.batch_size", lambda v: v % groups == 0,
             f"must be a multiple of objective.direction_group_rows={groups} (a batch holds whole "
             "direction groups)")
    if "model" in config and "fsq" in config:  # a document longer than a row: now, not after
        _from_packer(config, "row_target_capacity")  # the data and tokenizer stages have run
        if first_fit_packing(config):
            row_image_slots(config)
    if _get_or(config, "sample.weights") == "ema" and not _get_or(config, "train.ema_decay", 0) > 0:
        raise ConfigError("config.sample.weights='ema' needs train.ema_decay > 0 (the run keeps "
                          "no average of its params otherwise)")
    for axis in ("data", "fsdp", "tensor"):
        _require(config, f"mesh.{axis}", lambda v: v == -1 or v >= 1,
                 "must be a positive size or -1 (the rest of the devices)")
    _pos(config, ["mesh.dcn_data"])
    _require(config, "mesh.cpu_devices", lambda v: int(v) == v and v >= 0,
             "must be an integer >= 0 (0: XLA's default CPU devices)")
    _require(config, "mesh.malloc_hugepages", lambda v: isinstance(v, bool), "must be True or False")
    return config


# ---- the blocks the typed configs are built from (also run by `validate`) ---------------------
def _validate_model(config) -> None:
    _pos(config, ["model.num_modalities", "model.num_layers", "model.d_model", "model.num_heads",
                  "model.mlp_dim", "model.max_seq_len", "model.flow_depth", "model.flow_width",
                  "model.flow_t_samples", "model.mot_tile", "model.attention_block"])
    _require(config, "model.num_heads",
             lambda v: _get(config, "model.d_model") % v == 0
             and (_get(config, "model.d_model") // v) % 2 == 0,
             "must divide model.d_model into an even head dimension (RoPE rotates pairs)")
    for field in ("mot_impl", "attention_impl", "image_head", "dtype", "remat", "image_positions",
                  "image_input"):
        _one_of(config, f"model.{field}")
    _nonneg(config, ["model.noise_aug"])
    for p in ("model.rope_theta", "model.norm_eps"):
        _require(config, p, lambda v: v > 0, "must be > 0")


def _validate_objective(config) -> None:
    _one_of(config, "objective.flow_t_dist")
    _nonneg(config, ["objective.text_weight", "objective.image_weight"])
    _pos(config, ["objective.direction_group_rows", "objective.direction_redraws"])
    for p in ("objective.t2i_prob", "objective.caption_dropout", "objective.edit_chain_prob"):
        _require(config, p, lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")


def _validate_sample(config) -> None:
    _nonneg(config, ["sample.temperature", "sample.top_k", "sample.cfg_scale",
                     "sample.image_temperature", "sample.image_top_k",
                     "sample.flow_temperature", "sample.noise_aug"])
    _require(config, "sample.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    _pos(config, ["sample.ode_steps", "sample.num_samples", "sample.max_text_len",
                  "sample.batch_size"])
    _one_of(config, "sample.ode_solver")
    _one_of(config, "sample.cfg_schedule")
    _one_of(config, "sample.weights")


def _fields(cls, block: str, cfg, skip: Sequence[str] = ()) -> dict[str, Any]:
    """cfg[name] for every field of dataclass `cls` (one ConfigError listing the missing ones)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    missing = [n for n in names if n not in cfg]
    if missing:
        raise ConfigError(f"config.{block} lacks {missing} (see config_defaults.{block}_config)")
    return {n: cfg[n] for n in names}


def model_block(model_cfg: Mapping, vocab_size: int, fsq_levels: Sequence[int],
                image_side: int = 0, vq_dim: int = 0, image_capacity: int = 0,
                bucket_rows: int = 1) -> ModelConfig:
    """The checked, frozen ModelConfig of a `model` block, a text vocabulary and the image
    tokens' index levels (FSQ levels, or (K,) with `vq_dim` > 0 for a learned codebook of K
    codes of width vq_dim), the image grid's side in tokens, which
    model.image_positions="learned_2d" needs, and the packer's image tokens per row at most
    (`image_capacity`, 0 = unknown: the MoT buckets' size), averaged over each `bucket_rows`
    consecutive rows."""
    if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size <= 0:
        raise ConfigError(f"vocab_size={vocab_size!r}: must be a positive integer")
    levels_error = _fsq_levels_error(fsq_levels)
    if levels_error:
        raise ConfigError(f"fsq_levels={tuple(fsq_levels)!r}: {levels_error}")
    _validate_model({"model": model_cfg})
    if model_cfg.get("image_positions", "none") != "none" and int(image_side) <= 0:
        raise ConfigError(f"model.image_positions={model_cfg['image_positions']!r} needs the image grid's side "
                          f"(image_side={image_side!r}): build it with config_validation.model_config")
    kw = _fields(ModelConfig, "model", model_cfg,
                 skip=("head", "vocab_size", "fsq_levels", "image_side", "vq_dim",
                       "image_capacity", "bucket_rows"))
    kinds = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    cast = {"int": int, "float": float, "bool": bool, "str": str}
    kw = {k: cast[kinds[k]](v) for k, v in kw.items()}
    return ModelConfig(**kw, head=image_heads.get(model_cfg["image_head"]),
                       vocab_size=int(vocab_size), fsq_levels=fsq.FSQ(fsq_levels).levels,
                       image_side=int(image_side), vq_dim=int(vq_dim),
                       image_capacity=int(image_capacity), bucket_rows=int(bucket_rows))


def image_token_codes(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int]:
    """(index levels, code width) of a config's image tokens: (fsq.levels, len(fsq.levels)) for
    FSQ, ((fsq.vq_codebook_size,), fsq.vq_dim) for a VQ tokenizer (LearnedCodebook's view)."""
    f = config.fsq
    if f.get("quantizer", "fsq") == "vq":
        return (int(f.vq_codebook_size),), int(f.vq_dim)
    levels = tuple(int(v) for v in f.levels)
    return levels, len(levels)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a full config (its `model` block, the image tokens' codes as
    `image_token_codes` says, the image grid's side: data.image_size over the tokenizer's
    downsampling factor, and the packer's image tokens per row)."""
    side = image_side(config)
    levels, dim = image_token_codes(config)
    vq_dim = dim if config.fsq.get("quantizer", "fsq") == "vq" else 0
    bucket_rows = 1
    try:  # 0 (no MoT buckets) when no document fits a row: target_capacity reports that layout
        if first_fit_packing(config):
            image_capacity, bucket_rows = row_image_slots(config), direction_group_rows(config)
        else:
            image_capacity = _from_packer(config, "row_image_capacity")
    except ConfigError:
        image_capacity = 0
    return model_block(config.model, vocab_size, levels, side, vq_dim, image_capacity, bucket_rows)


def first_fit_packing(config: ml_collections.ConfigDict) -> bool:
    """Whether the config packs caption/image documents first-fit (data.packing)."""
    return _get_or(config, "data.packing", "fixed") == "first_fit"


def row_image_slots(config: ml_collections.ConfigDict) -> int:
    """data.row_image_slots of a first_fit config (0: first_fit.default_image_slots), checked
    against the longest document (ConfigError naming the fields)."""
    seq_len, caption = int(config.model.max_seq_len), int(config.data.max_caption_len)
    per_image = image_side(config) ** 2
    slots = int(config.data.row_image_slots) or first_fit.default_image_slots(seq_len, caption, per_image)
    try:
        first_fit.check_image_slots(seq_len, caption, per_image, slots)
    except ValueError as e:
        raise ConfigError(f"config.data.row_image_slots={config.data.row_image_slots}: {e} "
                          f"(model.max_seq_len, data.max_caption_len, {per_image} image tokens)") from None
    return slots


def image_side(config: ml_collections.ConfigDict) -> int:
    """Image tokens per side: data.image_size over the tokenizer's downsampling factor."""
    return int(config.data.image_size) // _downsample_factor(config)


def _downsample_factor(config: ml_collections.ConfigDict) -> int:
    """Pixels per token side of the config's tokenizer (autoencoder.downsample_factor)."""
    return downsample_factor(config.fsq.channels, int(config.fsq.get("patch_size", 1)))


def direction_group_rows(config: ml_collections.ConfigDict) -> int:
    """Rows per direction group (objective.direction_group_rows) of the config's packer: 1 for
    edit documents (data.name="shapes_edits"), which have no text->image / image->text draw, and
    for configs without an objective block."""
    if _get_or(config, "data.name") == "shapes_edits":
        return 1
    return int(_get_or(config, "objective.direction_group_rows", 1))


def target_capacity(config: ml_collections.ConfigDict) -> TargetCapacity:
    """The static head capacity of a multimodal config's packed rows: the most text targets one
    row holds (the packer's row_target_capacity) and the most image targets one direction group
    holds (caption/image pairs: ceil(t2i_prob x the group's documents) images,
    packing.group_image_targets; edit documents: the one-row bound); the objective gathers the
    heads' positions to it (mmjax/targets.py)."""
    image, text = _from_packer(config, "row_target_capacity")
    if config.data.name == "shapes_edits":  # no direction draw: the one-row bound
        return TargetCapacity(image=image, text=text)
    groups, per_image = direction_group_rows(config), image_side(config) ** 2
    if first_fit_packing(config):
        seq_len, caption = int(config.model.max_seq_len), int(config.data.max_caption_len)
        cap = first_fit.t2i_per_group(float(config.objective.t2i_prob), groups,
                                      row_image_slots(config), per_image)
        return TargetCapacity(image=cap * per_image, group=groups,
                              text=first_fit.row_text_targets(seq_len, caption, per_image))
    image = packing.group_image_targets(float(config.objective.t2i_prob),
                                        groups * (image // per_image), per_image)
    return TargetCapacity(image=image, text=text, group=groups)


def _from_packer(config: ml_collections.ConfigDict, bound: str):
    """A static per-row bound of the config's packer (packing's for caption/image pairs,
    edit_packing's for data.name="shapes_edits"): `bound`(model.max_seq_len,
    data.max_caption_len, image tokens per image = image_side**2), its ValueError as one
    ConfigError naming the fields."""
    from mmjax.data import edit_packing
    side = image_side(config)
    seq_len, caption = int(config.model.max_seq_len), int(config.data.max_caption_len)
    packer = edit_packing if config.data.name == "shapes_edits" else packing
    try:
        return getattr(packer, bound)(seq_len, caption, side * side)
    except ValueError as e:
        raise ConfigError(f"config.model.max_seq_len={seq_len}: {e} (data.max_caption_len="
                          f"{caption}, {side * side} image tokens)") from None


def objective_config(objective_cfg: Mapping) -> ObjectiveConfig:
    """The checked, frozen ObjectiveConfig of an `objective` block."""
    _validate_objective({"objective": objective_cfg})
    kw = _fields(ObjectiveConfig, "objective", objective_cfg)
    kinds = {f.name: f.type for f in dataclasses.fields(ObjectiveConfig)}
    return ObjectiveConfig(**{k: {"int": int, "float": float, "str": str}[kinds[k]](v)
                              for k, v in kw.items()})


def sample_settings(sample_cfg: Mapping) -> SampleSettings:
    """The checked, frozen SampleSettings of a `sample` block (its sampling knobs only)."""
    _validate_sample({"sample": sample_cfg})
    kw = _fields(SampleSettings, "sample", sample_cfg)
    return SampleSettings(**{f.name: type(f.default)(kw[f.name])
                             for f in dataclasses.fields(SampleSettings)})
