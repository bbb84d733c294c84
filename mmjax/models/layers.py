"""Building blocks shared by the backbone and the heads: init helpers, RMSNorm, RoPE, attention
core, SwiGLU, remat policies (the KV cache: kv_cache.py).

Why plain functions where possible: the modality-routed modules in `mot.py` own the parameters
(stacked over modalities); what is left here is math that does not care which modality a token
belongs to, so it is written once and tested once.

Conventions: parameters are float32 and carry logical axis names (see `mmjax/parallel.py`);
compute runs in `dtype` (the config's `model.dtype`); norms and softmax run in float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmjax.choices import CHOICES

# Finite "minus infinity" for masked logits: keeps fully masked rows NaN-free in any dtype.
_MASK_VALUE = -1e30


def resolve_dtype(name) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp.dtype, with a clear error."""
    try:
        dtype = jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"model.dtype={name!r}: not a dtype ({e}).") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"model.dtype={name!r}: must be a floating dtype.")
    return dtype


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    """An initializer whose parameter carries logical axis `names` (one per dimension)."""
    return nn.with_logical_partitioning(init, tuple(names))


def fan_in_init(in_axis, out_axis, batch_axis=(), scale: float = 1.0) -> Callable:
    """LeCun-normal over the given fan-in axes (batch axes, e.g. `modality`, are excluded)."""
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis,
                                            out_axis=out_axis, batch_axis=batch_axis)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh / without rules)."""
    return nn.with_logical_constraint(x, tuple(names))


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32 (scale applied by the caller)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale (one modality; see mot.ModalityRMSNorm for MoT)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        return (rms_normalize(x, self.eps) * scale).astype(self.dtype)


# ---- rotary position embedding ---------------------------------------------------------------
def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B, T, H, Dh] at integer `positions` (rotate-half form).

    Positions are the in-document positions of the packed batch, so every packed document starts
    at angle 0 and attention scores depend only on in-document offsets.

    `positions` is [B, T] (1-D RoPE) or [B, T, A] (multi-axis RoPE, as Qwen2-VL's M-RoPE): then
    frequency i rotates by the position on axis i % A. Interleaving gives every axis both fast
    and slow frequencies (contiguous sections would leave an image's row and column, which span
    only a few units, the slowest ones, which barely turn). A token whose A positions are equal
    (text) gets exactly the 1-D rotation.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim} "
                         "(model.d_model // model.num_heads).")
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    positions = positions.astype(jnp.float32)
    if positions.ndim == 3:  # [B, T, A] -> the position each frequency turns by, [B, T, half]
        positions = jnp.take(positions, jnp.arange(half) % positions.shape[-1], axis=-1)
    else:
        positions = positions[..., None]
    angles = positions * inv_freq  # [B, T, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ---- attention core --------------------------------------------------------------------------
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention. q [B, T, H, Dh], k/v [B, S, H, Dh], mask bool [B, T, S] (True = may
    attend) -> [B, T, H, Dh]. Logits and softmax in float32; every row must allow >= 1 key
    (the masks in `masks.py` always allow self)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


# ---- feed-forward ----------------------------------------------------------------------------
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU activation (Shazeer 2020): silu(gate) * up."""
    return nn.silu(gate) * up


# ---- activation checkpointing ----------------------------------------------------------------
def _dots_policy(prim, *args, **params) -> bool:
    """Save matmul outputs without batch dims, *including* `ragged_dot` (the MoT projections),
    which jax's built-in dots policies do not recognise; recompute the rest (norms, softmax...)."""
    if prim.name == "ragged_dot_general":
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


def remat_module(module_cls, mode: str):
    """Wraps a block class with `nn.remat` per `model.remat` ("none" | "full" | "dots")."""
    if mode == "none":
        return module_cls
    if mode == "full":
        return nn.remat(module_cls, prevent_cse=True)
    if mode == "dots":
        return nn.remat(module_cls, prevent_cse=True, policy=_dots_policy)
    raise ValueError(f"model.remat={mode!r}: must be one of {CHOICES['model.remat']}.")


def sincos_2d(row: jax.Array, col: jax.Array, dim: int) -> jax.Array:
    """Fixed 2-D position features [..., dim] of integer (row, col) grid coordinates (MAE's
    2-D sin-cos embedding): half the channels encode the row, half the column, each as sines and
    cosines of geometric frequencies (period 2 pi .. 2 pi * 10000 in grid cells).

    Scaled so the vector has unit norm, like the other input embeddings at initialisation (a
    text embedding row ~ N(0, 1/d), a projected code of norm ~1), so it informs without
    swamping them. Needs nothing learned: an image token knows its row and column from step 0.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(quarter, dtype=jnp.float32) / quarter)

    def one_axis(x):
        angle = x.astype(jnp.float32)[..., None] * freqs
        return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)

    # sin^2 + cos^2 = 1 per frequency: 2 * quarter of them, so the squared norm is dim / 2.
    return jnp.concatenate([one_axis(row), one_axis(col)], axis=-1) * (2.0 / dim) ** 0.5

