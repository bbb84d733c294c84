"""Finite Scalar Quantization (Mentzer et al., ICLR 2024, arXiv 2309.15505) — the math only.

Why FSQ: each latent channel is bounded with `tanh` and rounded to a handful of levels, so the
codebook is implicit (the product of the per-channel level sets). There is nothing to learn, no
codebook / commitment loss and no dead codes to reseed; usage stays near 100%.

Conventions (identical to the reference implementation):
- `bound(z) = tanh(z + shift) * half_l - offset` with `half_l = (L-1)(1+eps)/2`,
  `offset = 0.5` for even L (0 for odd) and `shift = atanh(offset / half_l)`. For even L this
  shifts the range by half a step so that rounding yields exactly L integers.
- Codes are the rounded integers divided by `L // 2`, so they lie in [-1, 1]. For odd L the grid
  is symmetric (L=5: -2..2 / 2). For even L it is *asymmetric* (L=8: -4..3 / 4, i.e. -1 .. 0.75);
  that is the paper's reference behaviour and is kept on purpose so indices and checkpoints match.
- Indices are mixed-radix numbers over the shifted integers `codes * (L//2) + L//2 in [0, L)`,
  with basis `cumprod([1] + levels[:-1])` (the first channel varies fastest).

`FSQ` is a plain frozen dataclass, not a flax module: it holds no parameters. Every method works
on any leading batch shape (last axis = `dim`). `codes_to_indices`, `indices_to_codes` and
`snap` run on numpy when given numpy input (data code must not need a device) and on jax
otherwise (traceable under jit).
"""
from __future__ import annotations

import dataclasses
import math
import jax
import jax.numpy as jnp
import numpy as np

_BOUND_EPS = 1e-3  # The reference's margin so tanh's open range still rounds to L values.
_MAX_CODEBOOK = 2**31 - 1  # Indices are int32.


def _xp(x):
    """numpy for host data (numpy arrays, python scalars, lists), jax.numpy for device arrays / tracers."""
    return jnp if isinstance(x, jax.Array) else np


def levels_problem(levels) -> str | None:
    """Why `levels` cannot make an FSQ quantizer, or None. The one home of the FSQ-levels rule:
    FSQ's constructor raises with it and config_validation reports it for config.fsq.levels."""
    try:
        levels = tuple(levels)
    except TypeError:
        return "must be a sequence of ints >= 2, e.g. (8, 5, 5, 5)"
    if not levels:
        return "needs at least one level, e.g. (8, 5, 5, 5)"
    for i, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 2:
            return f"levels[{i}]={level!r}: every level must be an integer >= 2"
    if math.prod(levels) > _MAX_CODEBOOK:
        return (f"codebook size {math.prod(levels)} does not fit int32 indices; use fewer or "
                "smaller levels")
    return None


@dataclasses.dataclass(frozen=True)
class FSQ:
    """An FSQ quantizer for the given per-channel `levels` (each an int >= 2)."""

    levels: tuple[int, ...]

    def __post_init__(self):
        problem = levels_problem(self.levels)
        if problem:
            raise ValueError(f"FSQ levels={self.levels!r}: {problem}.")
        levels = tuple(int(level) for level in self.levels)
        object.__setattr__(self, "levels", levels)

    # ---- static properties -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of latent channels (one per level)."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """Size of the implicit codebook, prod(levels)."""
        return math.prod(self.levels)

    @property
    def half_width(self) -> np.ndarray:
        """`L // 2` per channel: the divisor that normalises integer codes to [-1, 1]."""
        return np.array([level // 2 for level in self.levels], np.int64)

    @property
    def basis(self) -> np.ndarray:
        """Mixed-radix place values, cumprod([1] + levels[:-1])."""
        return np.cumprod((1,) + self.levels[:-1]).astype(np.int64)

    def int_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest integer code per channel (-(L//2) and L-1-L//2)."""
        half = self.half_width
        return -half, np.array(self.levels, np.int64) - 1 - half

    def grid_values(self) -> list[np.ndarray]:
        """The normalised code values of each channel, ascending (float32)."""
        lo, hi = self.int_range()
        return [np.arange(l, h + 1, dtype=np.float32) / np.float32(w)
                for l, h, w in zip(lo, hi, self.half_width)]

    def codebook(self) -> np.ndarray:
        """All codes in index order, float32 [codebook_size, dim] (meant for small codebooks)."""
        return self.indices_to_codes(np.arange(self.codebook_size, dtype=np.int64))

    # ---- quantisation ------------------------------------------------------------------------
    def bound(self, z: jax.Array) -> jax.Array:
        """Squashes z [..., dim] into (-(L//2) - margin, L-1-L//2 + margin) per channel."""
        levels = np.array(self.levels, np.float64)
        half_l = (levels - 1.0) * (1.0 + _BOUND_EPS) / 2.0
        offset = np.where(self.levels_even(), 0.5, 0.0)
        shift = np.arctanh(offset / half_l)
        dtype = jnp.result_type(z, jnp.float32)
        return (jnp.tanh(z + shift.astype(dtype)) * half_l.astype(dtype)
                - offset.astype(dtype))

    def levels_even(self) -> np.ndarray:
        """Boolean mask of the channels with an even number of levels."""
        return np.array([level % 2 == 0 for level in self.levels])

    def quantize(self, z: jax.Array) -> jax.Array:
        """Normalised codes in [-1, 1] [..., dim], with a straight-through gradient.

        The rounding is skipped on the backward pass, so d quantize / dz = d bound / dz / (L//2).
        """
        self._check_last_axis(z, "z")
        bounded = self.bound(z)
        rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
        return rounded / jnp.asarray(self.half_width, bounded.dtype)

    def snap(self, x):
        """Nearest grid code for arbitrary vectors x [..., dim] (e.g. flow-sampler outputs).

        Values outside the grid are clipped to its ends. No gradient is meant to flow here.
        """
        self._check_last_axis(x, "x")
        xp = _xp(x)
        x = xp.asarray(x)
        dtype = x.dtype if xp.issubdtype(x.dtype, xp.floating) else np.float32
        half = self.half_width.astype(dtype)
        lo, hi = self.int_range()
        ints = xp.clip(xp.round(x.astype(dtype) * half), lo.astype(dtype), hi.astype(dtype))
        return ints / half

    # ---- indices -----------------------------------------------------------------------------
    def codes_to_indices(self, codes):
        """int32 indices [...] of normalised grid codes [..., dim] (mixed radix)."""
        self._check_last_axis(codes, "codes")
        xp = _xp(codes)
        codes = xp.asarray(codes)
        half = self.half_width
        shifted = xp.round(codes * half.astype(codes.dtype) + half.astype(codes.dtype))
        return xp.sum(shifted.astype(xp.int32) * self.basis.astype(np.int32), axis=-1).astype(xp.int32)

    def indices_to_codes(self, indices):
        """Normalised float32 codes [..., dim] of integer indices [...]; inverse of codes_to_indices."""
        xp = _xp(indices)
        indices = xp.asarray(indices)
        if not xp.issubdtype(indices.dtype, xp.integer):
            raise ValueError(f"FSQ.indices_to_codes: indices must be integers, got dtype {indices.dtype}.")
        levels = np.array(self.levels, np.int32)
        shifted = (indices[..., None].astype(xp.int32) // self.basis.astype(np.int32)) % levels
        half = self.half_width.astype(np.float32)
        return (shifted.astype(xp.float32) - half) / half

    def _check_last_axis(self, x, name: str) -> None:
        shape = np.shape(x)
        if not shape or shape[-1] != self.dim:
            raise ValueError(f"FSQ: {name} has shape {tuple(shape)}; its last axis must be "
                             f"dim={self.dim} (levels={self.levels}).")
