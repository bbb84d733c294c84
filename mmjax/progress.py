"""What a training run shows while it runs: throughput, MFU, a progress bar or log lines, a
profiler window.

Why here and not in the loop: these are pure bookkeeping around the step (the loop calls
`Watch.step` and `Watch.log`), and each figure is defined once:
- tokens/s counts REAL tokens (what the task's `count_tokens` says: padding excluded), so
  throughput and MFU do not improve by padding more;
- model TFLOP/s per device = real tokens/s x the task's analytic training FLOPs per token
  (mmjax.flops) / devices; MFU = that over the device's peak (`train.peak_tflops`, or the table
  in mmjax.flops by device kind; None where unknown, e.g. CPU);
- a tqdm bar only when stderr is a terminal; otherwise (SLURM / pod log files) one plain line every
  `train.log_every` steps with the step, loss, tokens/s and ETA;
- `train.profile_steps=(start, stop)` writes a jax.profiler trace of steps [start, stop) into
  <run>/profile (TensorBoard's profile plugin or Perfetto read it).
"""
from __future__ import annotations

import logging
import os
import sys
import time

import jax

from mmjax import flops as flops_lib


def peak_flops(tc) -> float | None:
    """Peak FLOP/s of one device: `train.peak_tflops` when set, else by device kind (or None)."""
    if float(tc.get("peak_tflops", 0.0) or 0.0) > 0:
        return float(tc.peak_tflops) * 1e12
    return flops_lib.peak_flops_for_device(jax.devices()[0].device_kind)


def _show_bar(tc) -> bool:
    return bool(tc.progress_bar) and jax.process_index() == 0 and sys.stderr.isatty()


class Watch:
    """Counts work between log steps and turns it into the figures of the module docstring."""

    def __init__(self, task, tc, start: int, run_dir):
        self.task, self.tc, self.start, self.total = task, tc, start, int(tc.steps)
        self.flops_per_token = getattr(task, "flops_per_token", None)
        self.peak = peak_flops(tc)
        self.devices = jax.device_count()
        self.tokens = self.examples = 0
        self.t0, self.s0 = time.perf_counter(), start
        self.run_dir = run_dir
        window = tuple(int(v) for v in (tc.get("profile_steps", ()) or ()))
        self.profile = window if len(window) == 2 and window[1] > window[0] else None
        self._tracing = False
        self.bar = None
        if _show_bar(tc):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=start, desc=task.name, dynamic_ncols=True)

    def count(self, host_batch) -> None:
        """Adds one step's (process-local) batch, before it is sharded."""
        first = next(iter(host_batch.values()))
        self.examples += len(first)
        counter = getattr(self.task, "count_tokens", None)
        self.tokens += int(counter(host_batch)) if counter else 0

    def before_step(self, step: int) -> None:
        """Starts the profiler at the window's first step (`step` = steps done so far)."""
        if self.profile and step == self.profile[0] and not self._tracing:
            path = os.fspath(self.run_dir / "profile")
            logging.info("profiling steps [%d, %d) into %s", *self.profile, path)
            jax.profiler.start_trace(path)
            self._tracing = True

    def after_step(self, step: int, metrics_so_far: dict) -> None:
        if self._tracing and step >= self.profile[1]:
            self.stop_profile()
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in metrics_so_far:  # nothing to show before the first logged step
                self.bar.set_postfix(loss=f"{metrics_so_far['loss']:.4f}", refresh=False)

    def stop_profile(self) -> None:
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False

    def rates(self, step: int) -> dict[str, float]:
        """Throughput since the previous call (all processes: counts are per process)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        procs = jax.process_count()
        out = {"steps_per_sec": (step - self.s0) / elapsed,
               "examples_per_sec": self.examples * procs / elapsed}
        if self.tokens:
            tokens_per_sec = self.tokens * procs / elapsed
            out["tokens_per_sec"] = tokens_per_sec
            if self.flops_per_token:
                tflops = tokens_per_sec * self.flops_per_token / self.devices / 1e12
                out["tflops_per_device"] = tflops
                out["mfu"] = tflops * 1e12 / self.peak if self.peak else None  # null: unknown
        self.tokens = self.examples = 0
        self.t0, self.s0 = time.perf_counter(), step
        return out

    def log_line(self, step: int, metrics: dict) -> None:
        """The plain progress line (process 0, when there is no bar)."""
        if self.bar is not None or jax.process_index() != 0:
            return
        rate = metrics.get("steps_per_sec", 0.0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"{self.task.name} step {step}/{self.total}",
                 f"loss={metrics.get('loss', float('nan')):.4f}"]
        if "tokens_per_sec" in metrics:
            parts.append(f"tokens/s={metrics['tokens_per_sec']:.0f}")
        if metrics.get("mfu") is not None:
            parts.append(f"mfu={metrics['mfu']:.1%}")
        parts.append(f"eta={_duration(eta)}")
        logging.info("%s", " ".join(parts))

    def close(self) -> None:
        self.stop_profile()
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
