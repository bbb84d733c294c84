"""The stages of the data flow, each a module with `run(config, workdir)`, run by `main --mode`.

    data -> tokenizer -> tokenize -> model -> sample

Why stages: a pod job usually runs one stage (`--mode=model`), the README demo runs them all
(`--mode=pipeline`), and every stage is idempotent: rerunning resumes or skips finished work and
never overwrites data or checkpoints. Only the data stage writes data; a later stage whose input
is missing fails with one line naming the stage to run.
"""
from __future__ import annotations

import importlib

import jax

from mmjax import cloud, io
from mmjax.errors import InputError
from mmjax.workdir import Workdir

STAGES = ("data", "tokenizer", "tokenize", "model", "sample")  # modules of this package, in order
MODEL_STAGES = ("tokenize", "model", "sample")  # need a config with a `model` block


def plan(mode: str, has_model: bool) -> list[str]:
    """The stages `--mode=mode` runs, in order (`eval` is another name for `sample`)."""
    if mode == "pipeline":
        return ["data", "tokenizer"] + (list(MODEL_STAGES) if has_model else [])
    stage = "sample" if mode == "eval" else mode
    if stage in MODEL_STAGES and not has_model:
        raise InputError(f"--mode={mode} needs a config with a `model` block "
                         "(e.g. configs/mot_shapes.py), not a tokenizer-only config")
    return ["data", "tokenizer"] if stage == "tokenizer" else [stage]


def run_mode(config, workdir, mode: str) -> dict:
    """Runs the stages of `mode`; process 0 writes their summaries to results_<mode>.json."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir.from_config(config, workdir)
    cloud.check_workdir(wd)  # gs://: credentials and buckets exist (one line naming the path)
    io.make_dirs(wd.root)  # a root that cannot be a directory fails here, naming the path
    cloud.check_shared(wd)  # multi-process: a host that cannot see the workdir says so
    results = {name: stage(name).run(config, wd) for name in plan(mode, "model" in config)}
    if jax.process_index() == 0:
        io.write_json_atomic(wd.results(mode), results)
    return results


def stage(name: str):
    """The module of stage `name` (imported on first use: stages import each other's helpers,
    so the package itself imports none of them eagerly and no import runs in a circle)."""
    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{name}")


def __getattr__(name: str):
    """`stages.data`, `stages.model`, ... as attributes (see `stage`)."""
    if name in STAGES:
        return stage(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
