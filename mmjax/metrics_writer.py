"""Metrics to TensorBoard event files and a metrics.jsonl, from process 0 only.

Why both: TensorBoard for people, JSON lines for scripts (sweeps, benchmarks, notebooks) that must
not depend on an event-file reader.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np


class MetricsWriter:
    """Writes scalars; a no-op on processes other than 0."""

    def __init__(self, workdir: str, prefix: str = ""):
        self.active = jax.process_index() == 0
        self.prefix = prefix
        self.jsonl_path = os.path.join(workdir, f"{prefix or 'train'}_metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", prefix or "train"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        for name, value in clean.items():
            if math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _to_float(value) -> float:
    return float(np.asarray(value))


def read_jsonl(path: str) -> list[dict]:
    """Reads a metrics.jsonl written above."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
