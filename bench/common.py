"""Shared bits of the benchmark scripts: loading a config file by path and writing results JSON."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
from ml_collections import config_flags

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def load_config(spec: str):
    """`configs/X.py:arg` -> ConfigDict, exactly as `--config=` would load it."""
    path, _, arg = spec.partition(":")
    module = config_flags.config_flags._LoadConfigModule("bench_config", path)  # noqa: SLF001
    return module.get_config(arg) if arg else module.get_config()


def git_commit() -> str:
    """The commit the benchmark ran at (recorded in every result JSON), or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "num_devices": len(devices), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": git_commit()}


def window_rates(run_dir: str) -> list[float]:
    """steps/s of every logged window of a trained stage (<run_dir>/train_metrics.jsonl), in
    order; the first window holds the compile."""
    from mmjax.metrics_writer import read_jsonl
    rows = read_jsonl(os.path.join(run_dir, "train_metrics.jsonl"))
    return [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]


def steady_rates(run_dir: str) -> list[float]:
    """The windows after the first (compile), or the first alone when it is the only one."""
    rates = window_rates(run_dir)
    return rates[1:] or rates


def run_stage(config: str, workdir: str, mode: str, *overrides: str,
              env: dict[str, str] | None = None) -> None:
    """One `mmjax` process (its own device count, its own compile) running `mode` of `config` in
    `workdir`, with `env` added to this process's environment; its output goes to
    <workdir>/<mode>.log, and a failure raises with its tail."""
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, f"{mode}.log")
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-m", "mmjax.main", f"--config={config}",
                               f"--workdir={workdir}", f"--mode={mode}", *overrides],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        with open(log_path) as log:
            raise RuntimeError(f"--mode={mode} in {workdir} failed: {log.read()[-600:]}")


STAGE_INPUTS = {"tokenizer": ("data",), "model": ("data", "tokenizer", "image_tokens")}
STAGE_BLOCK = {"tokenizer": "tokenizer_train", "model": "train"}
LOG_EVERY = 50  # steps per logged window: the first one holds the compile


def stage_inputs_ready(base: str) -> bool:
    """Whether `base` holds the finished inputs of every timed stage (data, tokenizer, tokens)."""
    return all(os.path.isdir(os.path.join(base, n)) for n in STAGE_INPUTS["model"])


def stage_base(config: str, base: str | None, workdir: str) -> str:
    """The workdir whose finished inputs the timed stages copy: `base` (a finished run, which
    must hold them: a ValueError names what it lacks) or <workdir>/base, built once."""
    if base and not stage_inputs_ready(base):
        raise ValueError(f"--base={base} lacks one of {STAGE_INPUTS['model']}")
    base = base or os.path.join(workdir, "base")
    build_stage_inputs(config, base)
    return base


def build_stage_inputs(config: str, base: str) -> None:
    """Data, a 50-step tokenizer and its image tokens in `base`, unless it holds them already:
    the step time of the stages timed on them does not depend on the tokenizer's quality."""
    if not stage_inputs_ready(base):
        for mode in ("tokenizer", "tokenize"):
            run_stage(config, base, mode, "--config.tokenizer_train.steps=50")


def timed_stage(config: str, base: str, workdir: str, stage: str, steps: int,
                *overrides: str, env: dict[str, str] | None = None) -> dict:
    """Trains `stage` ("tokenizer" or "model") of `config` for `steps` in a fresh `workdir` that
    starts from copies of `base`'s finished inputs, in its own `mmjax` process (its environment
    plus `env`). Returns its steps/s after the compile and the process's CPU time and minor page
    faults (getrusage)."""
    import resource
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)
    for name in STAGE_INPUTS[stage]:
        shutil.copytree(os.path.join(base, name), os.path.join(workdir, name))
    block = STAGE_BLOCK[stage]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_stage(config, workdir, stage, f"--config.{block}.steps={steps}",
              f"--config.{block}.log_every={LOG_EVERY}", f"--config.{block}.checkpoint_every={steps}",
              f"--config.{block}.eval_batches=1", *overrides, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"steps_per_sec": stage_steps_per_sec(os.path.join(workdir, stage)),
            "user_s": after.ru_utime - before.ru_utime,
            "system_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt}


def alternating_runs(config: str, base: str, workdir: str, stage: str, steps: int,
                     settings: dict[str, tuple[str, ...]], rounds: int,
                     envs: dict[str, dict[str, str]] | None = None) -> dict[str, list[dict]]:
    """`timed_stage` runs of `stage` under each of `settings` (name: config overrides; `envs`:
    name: environment variables, for what only the environment sets, such as XLA_FLAGS), the
    settings alternating within each of `rounds` rounds, so that load drifting on the host hits
    them alike. Returns each setting's runs in round order."""
    runs = {name: [] for name in settings}
    for _ in range(rounds):
        for name, overrides in settings.items():
            run = timed_stage(config, base, os.path.join(workdir, f"{stage}_{name}"), stage, steps,
                              *overrides, env=(envs or {}).get(name))
            runs[name].append(run)
            print(f"{stage} {name}: {run['steps_per_sec']:.2f} steps/s, user {run['user_s']:.0f} s,"
                  f" system {run['system_s']:.0f} s", flush=True)
    return runs


def round_summary(runs: list[dict]) -> dict:
    """Means of one setting's runs over the rounds, with the per-round values."""
    keys = runs[0].keys()
    return {**{k: statistics.mean(r[k] for r in runs) for k in keys},
            "per_round": {k: [r[k] for r in runs] for k in keys}}


def stage_steps_per_sec(run_dir: str) -> float:
    """Mean steps/s of a trained stage over its logged windows after the first (the compile)."""
    rates = window_rates(run_dir)
    if len(rates) < 2:
        raise RuntimeError(f"{run_dir}: fewer than 2 train-metric rows; raise the steps")
    return sum(rates[1:]) / len(rates[1:])


def write_results(name: str, results: dict, out: str | None = None, quiet: bool = False) -> str:
    """Write results + environment as JSON; quiet=True for the partial writes a long run makes
    after each item, so a run cut off by a time limit still leaves what it measured."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **results}, f, indent=2)
    if not quiet:
        print(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return path
