"""Metrics to TensorBoard event files and a metrics.jsonl, from process 0 only.

Why both: TensorBoard for people, JSON lines for scripts (sweeps, benchmarks, notebooks) that must
not depend on an event-file reader. Besides scalars, a run writes its config as text at start and,
every `train.eval_every` steps, what the task shows of itself (sample grids as images, captions as
text, rule-checker accuracies as scalars: `write_report`).

Paths go through etils.epath, so a bucket workdir works. An object store cannot append, so there
the jsonl is rewritten whole at each write (one upload, atomic), starting from the rows a previous
attempt left, and the event file is written to a local temp dir and uploaded at each write (what
tensorboardX's own gs:// writer does too, but that one re-uploads again from `__del__` at exit,
which hangs for minutes when the bucket is gone). On local disk rows are appended.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Mapping

import jax
import numpy as np

from mmjax import cloud, io


class MetricsWriter:
    """Writes scalars, text and images; a no-op on processes other than 0."""

    def __init__(self, run_dir, prefix: str = ""):
        self.active = jax.process_index() == 0
        self.prefix = prefix
        root = self.run_dir = io.as_path(run_dir)
        self.jsonl_path = root / f"{prefix or 'train'}_metrics.jsonl"
        self._tb = None
        self._remote_text: str | None = None  # the whole jsonl, for stores that cannot append
        self.events_dir = root / "tensorboard" / (prefix or "train")
        self._local_events = ""  # remote runs: where tensorboardX writes before each upload
        if self.active:
            io.make_dirs(root)
            if cloud.is_remote(root):
                self._remote_text = (self.jsonl_path.read_text() if self.jsonl_path.exists()
                                     else "")
                self._local_events = tempfile.mkdtemp(prefix="mmjax-events-")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self._local_events or os.fspath(self.events_dir))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: None if v is None else _to_float(v) for k, v in metrics.items()}
        for name, value in clean.items():  # None (e.g. MFU on an unknown device) is JSON null
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        line = json.dumps({"step": int(step), **clean}) + "\n"
        if self._remote_text is None:
            with self.jsonl_path.open("a") as f:
                f.write(line)
        else:
            self._remote_text += line
            io.write_text_atomic(self.jsonl_path, self._remote_text)
            self._tb.flush()
            self._upload_events()

    def _upload_events(self) -> None:
        for name in sorted(os.listdir(self._local_events)):
            io.copy_file_atomic(os.path.join(self._local_events, name), self.events_dir / name)

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
            if self._local_events:
                self._upload_events()
                shutil.rmtree(self._local_events, ignore_errors=True)


def _to_float(value) -> float:
    return float(np.asarray(value))


def read_jsonl(path) -> list[dict]:
    """Reads a metrics.jsonl written above (local or gs://)."""
    with io.as_path(path).open("r") as f:
        return [json.loads(line) for line in f if line.strip()]
