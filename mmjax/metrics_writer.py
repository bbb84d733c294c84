"""Metrics to TensorBoard event files and a metrics.jsonl, from process 0 only.

Why both: TensorBoard for people, JSON lines for scripts (sweeps, benchmarks, notebooks) that must
not depend on an event-file reader. Besides scalars, a run writes its config as text at start and,
every `train.eval_every` steps, what the task shows of itself (sample grids as images, captions as
text, rule-checker accuracies as scalars: `write_report`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np

from mmjax import io


class MetricsWriter:
    """Writes scalars, text and images; a no-op on processes other than 0."""

    def __init__(self, run_dir, prefix: str = ""):
        self.active = jax.process_index() == 0
        self.prefix = prefix
        self.run_dir = io.as_path(run_dir)
        self.jsonl_path = os.path.join(os.fspath(run_dir), f"{prefix or 'train'}_metrics.jsonl")
        self._tb = None
        if self.active:
            io.make_dirs(self.run_dir)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(os.fspath(run_dir), "tensorboard",
                                                  prefix or "train"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: None if v is None else _to_float(v) for k, v in metrics.items()}
        for name, value in clean.items():  # None (e.g. MFU on an unknown device) is JSON null
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.active:
            self._tb.add_text(tag, text, step)

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """uint8 [H, W, 3] image (e.g. a sample grid)."""
        if self.active:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def write_report(self, step: int, report: Mapping) -> None:
        """{"scalars": {name: value}, "images": {tag: uint8 HWC}, "text": {tag: str}}; the
        scalars also go to the jsonl, so a curve of e.g. text->image accuracy exists."""
        if report.get("scalars"):
            self.write(step, report["scalars"])
        for tag, image in report.get("images", {}).items():
            self.write_image(step, tag, image)
        for tag, text in report.get("text", {}).items():
            self.write_text(step, tag, text)

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
