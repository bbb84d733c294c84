"""Reconstruction metrics for the image tokenizer, computed from arrays only (no model is run).

- `psnr`: peak signal-to-noise ratio of the *pooled* MSE (all pixels of all images together), so
  evaluating in batches gives the same number as evaluating at once. It is defined beside the
  autoencoder's pixel range (mmjax.tokenizers.autoencoder), whose training loss reports it too.
- `codebook_stats`: how much of the implicit FSQ codebook a set of tokens uses (fraction of codes
  seen at least once) and the perplexity of the code counts (exp of its entropy, in codes:
  equals codebook_size for a perfectly uniform use, 1 when one code takes everything).
- `usage_by_token_count`: usage over the first n tokens for several n (usage grows with n).
- `evaluate_autoencoder`: both over a stream of batches, accumulating sparse code counts.
- `make_grid`: originals above their reconstructions as one array (mmjax.pictures writes it).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np

from mmjax.tokenizers.autoencoder import psnr, psnr_from_mse  # noqa: F401 (re-exported)


def _checked_indices(indices, codebook_size: int, caller: str = "code_counts") -> np.ndarray:
    """`indices` as a flat integer array, or a ValueError naming `caller` when they are not
    integers in [0, codebook_size)."""
    indices = np.asarray(indices)
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{caller}: indices must be integers, got dtype {indices.dtype}.")
    if indices.size and (indices.min() < 0 or indices.max() >= codebook_size):
        raise ValueError(f"{caller}: indices span [{indices.min()}, {indices.max()}], outside "
                         f"[0, codebook_size={codebook_size}).")
    return indices.reshape(-1)


def code_counts(indices, codebook_size: int) -> Counter:
    """Counter {code: count} of the codes present in an integer array of any shape (pool several
    with `Counter.update`).

    Sparse, not a [codebook_size] histogram: an FSQ grid can hold 2^24-2^30 codes (wide codes
    for 4x4-token images), far more than any evaluation has tokens, and a dense histogram of
    that size would not fit in memory."""
    codes, counts = np.unique(_checked_indices(indices, codebook_size), return_counts=True)
    return Counter(dict(zip(codes.tolist(), counts.tolist())))


def counts_stats(counts: dict[int, int], codebook_size: int) -> dict[str, float]:
    """usage (fraction of the codebook seen) and perplexity (exp entropy, nats) of code counts."""
    counted = np.fromiter(counts.values(), np.float64, len(counts))
    total = counted.sum()
    if total <= 0:
        raise ValueError("counts_stats: no tokens were counted.")
    p = counted[counted > 0] / total
    return {"usage": float(np.count_nonzero(counted) / codebook_size),
            "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


def codebook_stats(indices, codebook_size: int) -> dict[str, float]:
    """Codebook usage and perplexity of the tokens in `indices` (any integer array)."""
    return counts_stats(code_counts(indices, codebook_size), codebook_size)


def usage_by_token_count(index_batches: Iterable[Any], codebook_size: int,
                         counts: Iterable[int]) -> dict[int, float]:
    """Codebook usage over the first n tokens of a stream, for each n in `counts`.

    Why: usage is a count of distinct codes, so it depends on how many tokens are counted; a
    skewed code distribution (natural images: flat regions dominate) needs many tokens per code
    to show its tail. Reporting usage at several counts separates "the quantizer never emits these
    codes" from "too few tokens were counted to see them" (the FSQ paper counts ImageNet's whole
    validation set, 12.8M tokens, i.e. >= 195x its largest codebook). Tokens are taken in stream
    order, flattened, so a prefix count is exact whatever the batch boundaries.
    """
    want = sorted({int(n) for n in counts})
    if not want or want[0] < 1:
        raise ValueError(f"usage_by_token_count: counts must be positive integers, got {want}.")
    seen: set[int] = set()  # a set, not [codebook_size] flags: see code_counts
    out, total = {}, 0
    for batch in index_batches:
        flat = _checked_indices(batch, codebook_size, "usage_by_token_count")
        while want and total + flat.size >= want[0]:
            take = want[0] - total
            seen.update(np.unique(flat[:take]).tolist())
            flat, total = flat[take:], want[0]
            out[want.pop(0)] = len(seen) / codebook_size
        if not want:
            return out
        seen.update(np.unique(flat).tolist())
        total += flat.size
    raise ValueError(f"usage_by_token_count: the stream ended after {total} tokens; {want[0]} "
                     "were asked for (evaluate more images).")


def evaluate_autoencoder(apply_fn: Callable[[np.ndarray], tuple[Any, Any]],
                         batches: Iterable[Any], codebook_size: int,
                         max_val: float = 255.0) -> dict[str, float]:
    """PSNR, usage and perplexity of a tokenizer over a stream of batches.

    `batches` yields image arrays or dicts with an "image" entry; `apply_fn(images)` returns
    `(recon, indices)` with recon in the same pixel scale as `images` (uint8 -> `max_val` 255).
    PSNR is of the pooled MSE over every pixel seen; the code counts are pooled over every token.
    """
    sq_err, count, counts = 0.0, 0, Counter()
    for batch in batches:
        images = np.asarray(batch["image"] if isinstance(batch, dict) else batch)
        recon, indices = apply_fn(images)
        recon = np.asarray(recon)
        if recon.shape != images.shape:
            raise ValueError(f"evaluate_autoencoder: apply_fn returned recon of shape {recon.shape} "
                             f"for images of shape {images.shape}.")
        diff = recon.astype(np.float64) - images.astype(np.float64)
        sq_err += float(np.sum(diff * diff))
        count += diff.size
        counts.update(code_counts(np.asarray(indices), codebook_size))
    if count == 0:
        raise ValueError("evaluate_autoencoder: `batches` yielded no images.")
    mse = sq_err / count
    value = math.inf if mse == 0 else 10.0 * math.log10(max_val**2 / mse)
    return {"psnr": value, "mse": mse, **counts_stats(counts, codebook_size)}


def make_grid(originals: np.ndarray, recons: np.ndarray, ncols: int, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """uint8 [rows*2*(H+pad)+pad, ncols*(W+pad)+pad, 3]: each row of originals above its recons."""
    originals, recons = np.asarray(originals), np.asarray(recons)
    for name, x in (("originals", originals), ("recons", recons)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"make_grid: {name} must be uint8 [N, H, W, 1|3], got "
                             f"{x.dtype} {x.shape}.")
    if originals.shape != recons.shape:
        raise ValueError(f"make_grid: originals {originals.shape} and recons "
                         f"{recons.shape} differ in shape.")
    if ncols < 1:
        raise ValueError(f"make_grid: ncols={ncols} must be >= 1.")
    if originals.shape[-1] == 1:
        originals, recons = np.repeat(originals, 3, -1), np.repeat(recons, 3, -1)
    n, h, w, _ = originals.shape
    rows = max(1, math.ceil(n / ncols))
    grid = np.full((rows * 2 * (h + pad) + pad, ncols * (w + pad) + pad, 3), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        x = pad + c * (w + pad)
        y = pad + 2 * r * (h + pad)
        grid[y:y + h, x:x + w] = originals[i]
        grid[y + h + pad:y + 2 * h + pad, x:x + w] = recons[i]
    return grid
