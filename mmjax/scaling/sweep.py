"""Scaling sweeps: a grid of ordinary training runs sharing one data / tokenizer build.

  python -m mmjax.scaling.sweep --config=configs/sweep_scaling.py:tiny --sweep_dir=DIR
  python -m mmjax.scaling.sweep --config=... --sweep_dir=DIR --list          # the grid
  python -m mmjax.scaling.sweep --config=... --sweep_dir=DIR --mode=prepare  # shared build only
  python -m mmjax.scaling.sweep --config=... --sweep_dir=DIR --point=K       # one point (arrays)
  python -m mmjax.scaling.sweep --config=... --sweep_dir=DIR --mode=report   # fits and plots

Layout: `<sweep_dir>/shared` holds the data, SentencePiece model, FSQ tokenizer and image tokens
(built once, reused through data.data_dir / data.sp_model_path / fsq.checkpoint_dir /
fsq.tokens_dir); `<sweep_dir>/runs/<name>` is each point's workdir (the usual `model/` run with
checkpoints and metrics) and its `result.json`; `report/` holds fits and figures.

Resumable: a point with a `result.json` (written atomically after training) is skipped; an
interrupted point resumes from its checkpoint. For cluster arrays run `--mode=prepare` once, then
one `--point=K` per task, then `--mode=report`. Results are JSON (never pickle).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mmjax import checkpointing, compilation_cache, config_validation, io, stages, train
from mmjax import flops as flops_lib
from mmjax.data import text
from mmjax.metrics_writer import read_jsonl
from mmjax.scaling import grid
from mmjax.scaling import report as report_lib
from mmjax.workdir import Workdir

SHARED = "shared"
RUNS = "runs"
RESULT = "result.json"
ATTEMPTS = "attempts.jsonl"


# ----------------------------------------------------------------------------- files


def run_dir(sweep_dir: str, name: str) -> str:
    return os.path.join(sweep_dir, RUNS, name)


# ----------------------------------------------------------------------------- shared build


def shared_overrides(base, sweep_dir: str) -> dict:
    """Config fields that point every run at the shared build in <sweep_dir>/shared."""
    shared = Workdir.from_config(base, os.path.abspath(os.path.join(sweep_dir, SHARED)))
    data_dir = shared.data_dir
    return {"data": {"data_dir": str(data_dir) if data_dir else base.data.data_dir,
                     "sp_model_path": str(shared.sp_model)},
            "fsq": {"checkpoint_dir": str(shared.tokenizer_checkpoints),
                    "tokens_dir": str(shared.image_tokens)}}


def prepare_shared(base, sweep_dir: str) -> dict:
    """Builds data, SentencePiece, FSQ tokenizer and image tokens once; returns their summary.

    Idempotent: a `shared.json` marker (written last) makes later calls return at once. A base
    config with fsq.checkpoint_dir set reuses that tokenizer instead of training one.
    """
    workdir = Workdir.from_config(base, os.path.join(sweep_dir, SHARED))
    marker = os.path.join(str(workdir), "shared.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    config_validation.validate(base)
    t0 = time.perf_counter()
    stages.data.run(base, workdir)
    tokenizer = {} if base.fsq.checkpoint_dir else stages.tokenizer.run(base, workdir)
    stages.tokenize.run(base, workdir)
    sp_path = shared_overrides(base, sweep_dir)["data"]["sp_model_path"]
    info = {"vocab_size": int(text.TextTokenizer(sp_path).vocab_size),
            "tokenizer": tokenizer, "wall_s": time.perf_counter() - t0}
    if jax.process_index() == 0:
        io.write_json_atomic(marker, info)
    logging.info("sweep: shared build ready in %.1fs: %s", info["wall_s"], info)
    return info


# ----------------------------------------------------------------------------- one point


def measure_image_fraction(config, workdir: str, rows: int = 64) -> float:
    """Fraction of packed positions whose next token is a generated image token (image_mask).

    This is the `image_fraction` of mmjax.flops (where the image head runs).
    """
    ds = stages.model.build_task(config, Workdir.from_config(config, workdir)).dataset(
        "train", train=True)
    n = min(int(rows), len(ds))
    return float(np.mean([np.mean(ds[i]["image_mask"]) for i in range(n)]))


def point_setup(sweep_cfg, sweep_dir: str, point: grid.Point, base, info: Mapping) -> dict:
    """The point's config plus the analytic numbers of its result (params, FLOPs, tokens)."""
    workdir = run_dir(sweep_dir, point.name)
    shared = shared_overrides(base, sweep_dir)
    config = grid.point_config(base, point, shared, sweep_cfg)
    vocab = int(info["vocab_size"])
    seq_len, batch = int(config.model.max_seq_len), int(config.train.batch_size)
    fraction = measure_image_fraction(config, workdir)
    model_cfg = config_validation.model_config(config, vocab)
    fpt = flops_lib.flops_per_token(model_cfg, seq_len, fraction)["train"]
    if point.flops_budget is not None:
        steps = grid.steps_for_flops(point.flops_budget, fpt, batch * seq_len,
                                     int(sweep_cfg.min_steps))
        config = grid.point_config(base, point, shared, sweep_cfg, steps=steps)
    config_validation.validate(config)
    counts = flops_lib.param_counts(config_validation.model_config(config, vocab))
    steps = int(config.train.steps)
    return {"config": config, "vocab_size": vocab, "seq_len": seq_len, "batch_size": batch,
            "steps": steps, "tokens_per_step": batch * seq_len, "tokens": steps * batch * seq_len,
            "image_fraction": fraction, "train_flops_per_token": fpt,
            "flops": fpt * steps * batch * seq_len,
            "n_params_total": counts["total"], "n_params_active": counts["active_per_token"],
            # One modality's blocks and final norm: what a token uses, no embeddings or heads.
            "n_params_backbone": counts["per_modality"],
            # Non-embedding parameters one token uses (MoT: one modality's backbone copy).
            "n_params_non_embedding": counts["active_per_token"] - counts["embedding"]}


def curves(rows: Sequence[Mapping[str, float]], tokens_per_step: int, flops_per_token: float,
           keys: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(validation curve, train curve) from metrics.jsonl rows: [{step, tokens, flops, key...}].

    A resumed run may log a step twice; the last row of a step wins.
    """
    val: dict[int, dict] = {}
    train: dict[int, dict] = {}
    for row in rows:
        step = int(row["step"])
        if any(k.startswith("val_") for k in row):
            val.setdefault(step, {}).update(
                {k[4:]: float(v) for k, v in row.items() if k[4:] in keys})
        else:
            train.setdefault(step, {}).update({k: float(v) for k, v in row.items() if k in keys})

    def as_list(by_step):
        return [{"step": s, "tokens": s * tokens_per_step,
                 "flops": s * tokens_per_step * flops_per_token, **by_step[s]}
                for s in sorted(by_step)]

    return as_list(val), as_list(train)


def _attempts(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _record_attempt(path: str, attempt: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(attempt) + "\n")


def _latest_step(directory: str) -> int:
    try:
        return checkpointing.latest_step(directory) if os.path.isdir(directory) else 0
    except FileNotFoundError:
        return 0


def make_result(point: grid.Point, setup: Mapping, summary: Mapping, rows, attempts,
                loss_keys: Sequence[str]) -> dict:
    """The JSON record of a finished point (see module doc of mmjax.scaling.report for keys)."""
    config = setup["config"]
    val_curve, train_curve = curves(rows, setup["tokens_per_step"],
                                    setup["train_flops_per_token"], loss_keys)
    validation = {k[4:]: float(v) for k, v in summary["validation"].items()}
    model_keys = ("num_modalities", "num_layers", "d_model", "num_heads", "mlp_dim",
                  "image_head", "flow_width", "flow_depth", "flow_t_samples")
    return {
        "name": point.name, "index": point.index, "size": point.size, "budget": point.budget,
        "arch": point.arch, "seed": int(config.seed), "shuffle_seed": int(config.data.shuffle_seed), "overrides": point.overrides, "flops_budget": point.flops_budget,
        "model": {k: config.model[k] for k in model_keys},
        **{k: v for k, v in setup.items() if k != "config"},
        **{k: validation[k] for k in loss_keys if k in validation},
        "validation": validation, "curve": val_curve, "train_curve": train_curve,
        "wall_s": float(sum(a["wall_s"] for a in attempts)), "attempts": list(attempts),
    }


def run_point(sweep_cfg, sweep_dir: str, point: grid.Point, *, base=None, info=None, mesh=None,
              stop_at_step: int | None = None) -> dict:
    """Trains one point (or skips it when its result exists); returns its result.

    An interrupted invocation (`stop_at_step` or SIGTERM) returns {"name", "status":
    "interrupted", "step"} and writes no result; the next call resumes from the checkpoint.
    """
    workdir = run_dir(sweep_dir, point.name)
    result_path = os.path.join(workdir, RESULT)
    if os.path.exists(result_path):
        logging.info("sweep: %s finished before, skipped", point.name)
        with open(result_path) as f:
            return {**json.load(f), "status": "skipped"}
    base = base if base is not None else grid.base_config(sweep_cfg)
    info = info if info is not None else prepare_shared(base, sweep_dir)
    setup = point_setup(sweep_cfg, sweep_dir, point, base, info)
    start = _latest_step(os.path.join(workdir, "model", "checkpoints"))
    logging.info("sweep: %s (point %d): N=%d, %d steps, %.3g FLOPs%s", point.name, point.index,
                 setup["n_params_non_embedding"], setup["steps"], setup["flops"],
                 f", resuming at step {start}" if start else "")
    t0 = time.perf_counter()
    wd = Workdir.from_config(setup["config"], workdir)
    summary = train.train(setup["config"], wd, stages.model.build_task(setup["config"], wd),
                          mesh=mesh, stop_at_step=stop_at_step)
    attempt = {"start_step": start, "end_step": int(summary["step"]),
               "wall_s": time.perf_counter() - t0}
    _record_attempt(os.path.join(workdir, ATTEMPTS), attempt)
    if summary.get("preempted"):
        return {"name": point.name, "status": "interrupted", "step": int(summary["step"])}
    rows = read_jsonl(os.path.join(workdir, "model", "train_metrics.jsonl"))
    result = make_result(point, setup, summary, rows,
                         _attempts(os.path.join(workdir, ATTEMPTS)), tuple(sweep_cfg.loss_keys))
    if jax.process_index() == 0:
        io.write_json_atomic(result_path, result)
    logging.info("sweep: %s done in %.1fs: %s", point.name, attempt["wall_s"],
                 {k: round(result[k], 4) for k in sweep_cfg.loss_keys if k in result})
    return {**result, "status": "trained"}


# ----------------------------------------------------------------------------- the sweep


def run_sweep(sweep_cfg, sweep_dir: str, *, indices: Sequence[int] | None = None, mesh=None,
              report: bool = True) -> list[dict]:
    """Runs the points `indices` (default: all) in order, then (optionally) the report."""
    if sweep_cfg.compilation_cache:
        # Grid points of equal shapes (budgets, resumes) compile only once.
        compilation_cache.enable(os.path.join(sweep_dir, "jax_cache"))
    all_points = grid.points(sweep_cfg)
    chosen = [grid.select(all_points, i) for i in indices] if indices is not None else all_points
    base = grid.base_config(sweep_cfg)
    info = prepare_shared(base, sweep_dir)
    if jax.process_index() == 0:
        io.write_json_atomic(os.path.join(sweep_dir, "sweep_config.json"),
                          json.loads(sweep_cfg.to_json_best_effort()))
    out = [run_point(sweep_cfg, sweep_dir, p, base=base, info=info, mesh=mesh) for p in chosen]
    if report and jax.process_index() == 0:
        report_lib.report(sweep_cfg, sweep_dir)
    return out


def describe(sweep_cfg) -> list[str]:
    """One line per point: index, name and its overrides (what `--list` prints)."""
    lines = []
    for p in grid.points(sweep_cfg):
        budget = f"flops={p.flops_budget:.3g}" if p.flops_budget else ""
        budget += "" if p.seed is None else f" seed={p.seed}"
        over = json.dumps({k: v for k, v in p.overrides.items() if k != "flops"},
                          sort_keys=True)
        lines.append(f"{p.index:4d}  {p.name:32s} {budget} {over}".rstrip())
    return lines


# ----------------------------------------------------------------------------- CLI


class _MmjaxLogsOnly(logging.Filter):
    """mmjax's INFO lines (one per run) and library warnings, minus known chatter."""

    NOISE = ("Using custom data configuration", "read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        if "/mmjax/" in record.pathname.replace("\\", "/"):
            return True
        return record.levelno >= logging.WARNING and not any(
            n in str(record.msg) for n in self.NOISE)


def _main(argv) -> None:
    flag = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.addFilter(_MmjaxLogsOnly())
    if flag.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/sweep_scaling.py:tiny")
    mode = "list" if flag.list else flag.mode
    if mode == "list":
        print("\n".join(describe(flag.config)))
        return
    if not flag.sweep_dir:
        raise app.UsageError("--sweep_dir is required")
    from mmjax import cloud
    if cloud.is_remote(flag.sweep_dir):  # os.path.abspath would make a local "gs:" folder
        raise app.UsageError(f"--sweep_dir={flag.sweep_dir}: sweeps need a local directory "
                             "(their runs' workdirs are local; mmjax.main takes gs:// workdirs)")
    sweep_dir = os.path.abspath(flag.sweep_dir)
    if mode == "prepare":
        prepare_shared(grid.base_config(flag.config), sweep_dir)
    elif mode == "report":
        report_lib.report(flag.config, sweep_dir)
    else:
        indices = None if flag.point < 0 else [flag.point]
        run_sweep(flag.config, sweep_dir, indices=indices, report=indices is None)


def entry() -> None:
    """Defines the flags only when run as a program (mmjax.main owns --config in-process)."""
    config_flags.DEFINE_config_file("config", None, "Sweep config, e.g. "
                                    "configs/sweep_scaling.py:tiny.", lock_config=True)
    flags.DEFINE_string("sweep_dir", None, "Directory of the sweep (shared build, runs, report).")
    flags.DEFINE_enum("mode", "run", ("run", "prepare", "list", "report"),
                      "run: points (all, or --point) then report; prepare: shared build only.")
    flags.DEFINE_integer("point", -1, "Run only this grid point (see --list); -1 runs all.")
    flags.DEFINE_bool("list", False, "Print the grid and exit (same as --mode=list).")
    try:
        app.run(_main)
    except ValueError as e:
        if os.environ.get("MMJAX_TRACEBACK"):
            raise
        print(f"mmjax.scaling.sweep: error: {e}", flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entry()
