"""PNG pictures of a run: reconstruction grids and titled sample grids, on any path (gs:// too).

Why apart from the metrics: evals/ computes numbers from arrays; writing files is a stage's job,
and every picture goes through mmjax.io so a bucket workdir works and no reader sees half a PNG.
"""
from __future__ import annotations

import io as io_lib
import math
import textwrap

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from mmjax import io
from mmjax.evals import recon


def save_png(image: np.ndarray, path) -> None:
    """uint8 [H, W, 3] (or [H, W]) as a PNG at `path` (folders created, written atomically)."""
    buffer = io_lib.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    io.write_bytes_atomic(path, buffer.getvalue())


def save_reconstruction_grid(originals, recons, path, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """Writes `recon.make_grid` (originals above their reconstructions) as a PNG; returns it."""
    grid = recon.make_grid(originals, recons, ncols, pad)
    save_png(grid, path)
    return grid


def save_titled_grid(images: np.ndarray, titles: list[str], path: str, ncols: int = 4) -> None:
    """uint8 images [N, H, W, 3] with wrapped titles as one PNG (matplotlib, no pyplot state)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    wrapped = [textwrap.fill(t, 32) for t in titles]
    lines = max([w.count("\n") + 1 for w in wrapped] + [1])
    fig = Figure(figsize=(2.2 * ncols, (2.2 + 0.12 * lines) * nrows), dpi=100)
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(wrapped[i], fontsize=6)
    fig.tight_layout()
    buffer = io_lib.BytesIO()
    fig.savefig(buffer, format="png")
    io.write_bytes_atomic(path, buffer.getvalue())
