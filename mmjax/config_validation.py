"""Checks a config before anything runs, so a bad value fails in one line naming the field.

Why up front: a negative step count or an odd head dimension otherwise surfaces minutes later as
a shape error deep inside jit, or worse, as a silently wrong run.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import ml_collections

from mmjax.errors import InputError


class ConfigError(InputError):
    """A config field holds a value mmjax cannot run with."""


def _get(config, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _require(config, path: str, ok: Callable[[Any], bool], what: str) -> None:
    try:
        value = _get(config, path)
    except (KeyError, AttributeError):
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


def _one_of(config, path: str, choices: tuple[str, ...]) -> None:
    _require(config, path, lambda v: v in choices, f"must be one of {', '.join(choices)}")


def _check_levels(levels) -> bool:
    return len(levels) > 0 and all(int(level) == level and level >= 2 for level in levels)


def validate_train_block(config, block: str) -> None:
    _pos(config, [f"{block}.{f}" for f in ("steps", "batch_size", "grad_accum", "checkpoint_every",
                                           "keep_checkpoints", "log_every", "eval_batches")])
    _nonneg(config, [f"{block}.{f}" for f in ("warmup_steps", "weight_decay", "grad_clip",
                                              "eval_every")])
    _require(config, f"{block}.lr", lambda v: v > 0, "must be > 0")
    _require(config, f"{block}.end_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    for b in ("b1", "b2"):
        _require(config, f"{block}.{b}", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _one_of(config, f"{block}.nan_policy", ("stop", "skip"))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first bad field; returns the config unchanged."""
    missing = [block for block in ("data", "mesh") if block not in config]
    if missing:  # e.g. a sweep config (configs/sweep_scaling.py) given to mmjax.main
        raise ConfigError(
            f"config has no {' or '.join(missing)} block (top-level fields: {sorted(config)}); "
            "is it a config for another entry point?")
    _require(config, "data.name", lambda v: isinstance(v, str) and v, "must name a dataset")
    _pos(config, ["data.image_size", "data.num_train", "data.num_validation", "data.num_test",
                  "data.max_objects", "data.sp_vocab_size"])
    _require(config, "data.image_size", lambda v: v >= 8, "must be at least 8 pixels")
    _require(config, "data.max_objects", lambda v: v <= 9, "at most 9 (one shape per 3x3 cell)")
    _require(config, "fsq.levels", _check_levels,
             "needs at least one level and every level must be an integer >= 2")
    _require(config, "fsq.channels", lambda v: len(v) > 0 and all(c > 0 for c in v),
             "needs at least one positive width")
    _require(config, "data.image_size",
             lambda v: v % (2 ** (len(_get(config, "fsq.channels")) - 1)) == 0
             if "fsq" in config else True,
             "must be divisible by the FSQ downsampling factor 2**(len(fsq.channels)-1)")
    _nonneg(config, ["fsq.num_res_blocks"])
    _one_of(config, "fsq.loss", ("l2", "l1+l2"))
    _pos(config, ["model.num_modalities", "model.num_layers", "model.d_model", "model.num_heads",
                  "model.mlp_dim", "model.max_seq_len", "model.flow_depth", "model.flow_width",
                  "model.flow_t_samples"])
    _require(config, "model.num_heads",
             lambda v: config.model.d_model % v == 0 and (config.model.d_model // v) % 2 == 0,
             "must divide model.d_model into an even head dimension (RoPE rotates pairs)")
    _one_of(config, "model.mot_impl", ("auto", "ragged", "tiled", "masked"))
    _pos(config, ["model.mot_tile"])
    _one_of(config, "objective.flow_t_dist", ("uniform", "logit_normal"))
    _one_of(config, "model.image_head", ("flow", "discrete"))
    _one_of(config, "model.dtype", ("float32", "bfloat16", "float16"))
    _one_of(config, "model.remat", ("none", "full", "dots"))
    _nonneg(config, ["model.noise_aug", "objective.text_weight", "objective.image_weight"])
    for p in ("objective.t2i_prob", "objective.caption_dropout"):
        _require(config, p, lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")
    for block in ("train", "tokenizer_train"):
        validate_train_block(config, block)
    _nonneg(config, ["sample.temperature", "sample.top_k", "sample.cfg_scale"])
    _require(config, "sample.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    _pos(config, ["sample.ode_steps", "sample.num_samples", "sample.max_text_len"])
    _one_of(config, "sample.ode_solver", ("euler", "heun"))
    for axis in ("data", "fsdp", "tensor"):
        _require(config, f"mesh.{axis}", lambda v: v == -1 or v >= 1,
                 "must be a positive size or -1 (the rest of the devices)")
    return config
