"""Metrics to TensorBoard event files and a metrics.jsonl, from process 0 only.

Why both: TensorBoard for people, JSON lines for scripts (sweeps, benchmarks, notebooks) that must
not depend on an event-file reader.

Paths go through etils.epath (and tensorboardX's own gs:// writer), so a bucket workdir works. An
object store cannot append, so there the jsonl is rewritten whole (atomically) at each write,
starting from the rows a previous attempt left; on local disk each row is appended.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np

from mmjax import cloud, io


class MetricsWriter:
    """Writes scalars; a no-op on processes other than 0."""

    def __init__(self, workdir, prefix: str = ""):
        self.active = jax.process_index() == 0
        self.prefix = prefix
        root = io.as_path(workdir)
        self.jsonl_path = root / f"{prefix or 'train'}_metrics.jsonl"
        self._tb = None
        self._remote_text: str | None = None  # the whole jsonl, for stores that cannot append
        if self.active:
            io.make_dirs(root)
            if cloud.is_remote(root):
                self._remote_text = (self.jsonl_path.read_text() if self.jsonl_path.exists()
                                     else "")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.fspath(root / "tensorboard" / (prefix or "train")))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        for name, value in clean.items():
            if math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        line = json.dumps({"step": int(step), **clean}) + "\n"
        if self._remote_text is None:
            with self.jsonl_path.open("a") as f:
                f.write(line)
        else:
            self._remote_text += line
            io.write_text_atomic(self.jsonl_path, self._remote_text)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _to_float(value) -> float:
    return float(np.asarray(value))


def read_jsonl(path) -> list[dict]:
    """Reads a metrics.jsonl written above (local or gs://)."""
    with io.as_path(path).open("r") as f:
        return [json.loads(line) for line in f if line.strip()]
