"""Sweep grids: a sweep config (`configs/sweep_*.py`) -> named points, each a full training config.

Why a grid of overrides and not a list of config files: every point of a scaling sweep is the
same base config with a few fields changed along independent axes (model size, token budget,
architecture). Writing the axes once keeps the points comparable by construction, and the point
index is stable (axes ordered by sorted names) so cluster array jobs can run `--point=K`.

Points may change only the blocks that do not alter the shared build (data, SentencePiece, FSQ
tokenizer, image tokens are built once per sweep): anything else is an error naming the entry.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import os
import re
from typing import Any, Mapping

import ml_collections

# Blocks a point may override; data / fsq / tokenizer_train are shared by every point.
POINT_BLOCKS = ("model", "train", "objective", "sample", "mesh")
SHARED_BLOCKS = ("data", "fsq", "tokenizer_train")
AXES = ("sizes", "budgets", "archs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*$")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep. `overrides` are nested {block: {field: value}} (size, arch, budget)."""

    index: int
    name: str
    size: str
    budget: str
    arch: str
    overrides: Mapping[str, Any]
    flops_budget: float | None  # Target training FLOPs (steps derived per size), or None.
    # Seed of the run (config.seed and data.shuffle_seed) when the sweep has a seeds axis; None
    # keeps the base config's seeds (and no seed in the point's name).
    seed: int | None = None


def resolve_path(path: str) -> str:
    """`path` if it exists, else relative to the repository (so specs work from any cwd)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    candidate = os.path.join(_REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def load_config_spec(spec: str) -> ml_collections.ConfigDict:
    """`configs/X.py[:arg]` -> ConfigDict, as `--config=` loads it (ValueError for a bad path)."""
    path, _, arg = str(spec).partition(":")
    full = resolve_path(path)
    if not os.path.isfile(full):
        raise ValueError(f"config spec {spec!r}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(
        "mmjax_sweep_" + re.sub(r"\W", "_", os.path.basename(full)), full)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _as_dict(value) -> dict:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value or {})


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str,
                    allowed: tuple[str, ...] | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` with nested `overrides` set; ValueError names bad or forbidden keys."""
    out = copy.deepcopy(config)
    for block, fields in _as_dict(overrides).items():
        if block == "flops":
            continue
        if block not in out:
            raise ValueError(f"{where}: no config block or field {block!r}")
        if not isinstance(fields, Mapping) and not isinstance(fields, ml_collections.ConfigDict):
            out[block] = fields  # A top-level scalar such as `seed`.
            continue
        if allowed is not None and block not in allowed:
            hint = " (shared by every point: set it in sweep.shared)" \
                if block in SHARED_BLOCKS else ""
            raise ValueError(f"{where}: a point may not override block {block!r}{hint}; "
                             f"allowed: {allowed}")
        for field, value in _as_dict(fields).items():
            if field not in out[block]:
                raise ValueError(f"{where}: no config field {block}.{field}")
            out[block][field] = value
    return out


def base_config(sweep_cfg) -> ml_collections.ConfigDict:
    """The base of every point: `base` spec (or `base_config`) with `shared` overrides applied."""
    if sweep_cfg.base:
        base = load_config_spec(sweep_cfg.base)
    elif sweep_cfg.get("base_config") is not None:
        base = copy.deepcopy(sweep_cfg.base_config)
    else:
        raise ValueError("sweep config: set sweep.base (e.g. 'configs/mot_shapes.py:smoke') or "
                         "sweep.base_config")
    if not isinstance(base, ml_collections.ConfigDict) or "model" not in base:
        raise ValueError("sweep config: the base config needs a `model` block (a mot_* config)")
    base = ml_collections.ConfigDict(base.to_dict())  # Unlocked, no shared references.
    base = apply_overrides(base, sweep_cfg.shared, "sweep.shared")
    base.train.progress_bar = False  # Many runs in one log: one line per run instead.
    return base


def _axis(sweep_cfg, axis: str) -> list[tuple[str, dict]]:
    """Sorted (name, overrides) entries of one axis; an empty axis is one entry named 'base'."""
    entries = _as_dict(sweep_cfg.get(axis))
    if not entries:
        return [("base", {})]
    for name, value in entries.items():
        if not _NAME.match(name):
            raise ValueError(f"sweep.{axis}: entry name {name!r} must match {_NAME.pattern} "
                             "(it becomes a directory name)")
        if not isinstance(value, Mapping):
            raise ValueError(f"sweep.{axis}.{name}: must map blocks to fields, got {value!r}")
    return sorted((k, _as_dict(v)) for k, v in entries.items())


def _merge(*overrides: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = {}
    for o in overrides:
        for block, fields in o.items():
            if isinstance(fields, Mapping):
                out.setdefault(block, {}).update(fields)
            else:
                out[block] = fields
    return out


def seeds(sweep_cfg) -> list[int | None]:
    """The seeds axis: [None] (base seeds, no axis) or the distinct ints of `sweep.seeds`."""
    values = list(sweep_cfg.get("seeds") or ())
    if not values:
        return [None]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"sweep.seeds={tuple(values)!r}: every seed must be an int >= 0")
    if len(set(values)) != len(values):
        raise ValueError(f"sweep.seeds={tuple(values)!r}: seeds must be distinct")
    return values


def points(sweep_cfg) -> list[Point]:
    """The grid sizes x budgets x archs (x seeds) in a stable order (index = position).

    With a seeds axis every (size, budget, arch) is run once per seed, named `..._seed<k>`;
    the seeds axis is innermost so that a point's seeds have neighbouring indices.
    """
    axes = [_axis(sweep_cfg, a) for a in AXES]
    seed_axis = seeds(sweep_cfg)
    out = []
    for combo in itertools.product(*axes):
        (size, so), (budget, bo), (arch, ao) = combo
        names = [n for n, a in zip((size, budget, arch), AXES) if sweep_cfg.get(a)]
        flops = bo.get("flops")
        if flops is not None and (isinstance(flops, bool) or not float(flops) > 0):
            raise ValueError(f"sweep.budgets.{budget}.flops={flops!r}: must be a number > 0")
        for seed in seed_axis:
            name = "_".join(names) or "base"
            out.append(Point(index=len(out), name=name if seed is None else f"{name}_seed{seed}",
                             size=size, budget=budget, arch=arch, overrides=_merge(so, ao, bo),
                             flops_budget=None if flops is None else float(flops), seed=seed))
    return out


def select(all_points: list[Point], index: int) -> Point:
    if not 0 <= index < len(all_points):
        raise ValueError(f"--point={index}: the sweep has {len(all_points)} points "
                         f"(0..{len(all_points) - 1}); see --list")
    return all_points[index]


def steps_for_flops(flops: float, train_flops_per_token: float, tokens_per_step: int,
                    min_steps: int) -> int:
    """Steps whose analytic training FLOPs come closest to `flops` (at least `min_steps`)."""
    per_step = train_flops_per_token * tokens_per_step
    return max(int(round(flops / per_step)), int(min_steps))


def schedule_overrides(sweep_cfg, steps: int, explicit: Mapping[str, Any]) -> dict:
    """Warmup, checkpoint, eval and log intervals scaled to `steps` (explicit point values win)."""
    derived = {
        "steps": int(steps),
        "warmup_steps": int(round(float(sweep_cfg.warmup_fraction) * steps)),
        "checkpoint_every": max(steps // max(int(sweep_cfg.checkpoints_per_run), 1), 1),
        "eval_every": (max(steps // int(sweep_cfg.evals_per_run), 1)
                       if int(sweep_cfg.evals_per_run) > 0 else 0),
        "log_every": max(steps // max(int(sweep_cfg.logs_per_run), 1), 1),
    }
    return {k: v for k, v in derived.items() if k not in explicit or k == "steps"}


def point_config(base: ml_collections.ConfigDict, point: Point, shared: Mapping[str, Any],
                 sweep_cfg, steps: int | None = None) -> ml_collections.ConfigDict:
    """Full config of `point`: base + point overrides + shared-build paths + derived schedule.

    `steps` (from a FLOPs budget) replaces train.steps; without it the point's or base's is kept.
    """
    where = f"sweep point {point.name!r}"
    config = apply_overrides(base, point.overrides, where, allowed=POINT_BLOCKS)
    config = apply_overrides(config, shared, "shared build")
    explicit = dict(point.overrides.get("train", {}))
    total = int(steps if steps is not None else config.train.steps)
    if total <= 0:
        raise ValueError(f"{where}: train.steps={total} must be > 0")
    for field, value in schedule_overrides(sweep_cfg, total, explicit).items():
        config.train[field] = value
    if point.seed is not None:
        # Init / per-step RNG and the data order both vary with the seed; the shared build (data,
        # tokenizer) stays the same, so seeds measure the run-to-run spread of training alone.
        config.seed = int(point.seed)
        config.data.shuffle_seed = int(point.seed)
    return config
