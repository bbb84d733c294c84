"""Output heads on the backbone's hidden state: text LM head, flow-matching head, FSQ-index head.

Position i's hidden state predicts token i+1 (docs/INTERFACES.md); which head applies is decided
by the objective / sampler from the next token's modality, not here.

- LM head: logits over the SentencePiece vocabulary, tied to the text embedding or its own matrix.
- Flow head (MAR / LatentLM "diffusion head", rectified-flow parametrisation as in JanusFlow):
  a small residual MLP on the noisy code vector x_t, modulated by AdaLN from
  cond = proj(hidden) + embed(t). It predicts the velocity v = x1 - x0. Being tiny, it can be
  evaluated for several (t, noise) samples per position per step at little cost.
- Index head: softmax over the prod(levels) FSQ codes, or factorised into one softmax per FSQ
  channel over its L_i levels (many fewer parameters for large codebooks; channels then are
  conditionally independent given the hidden state).

Logical axis names used here beyond the backbone's: `flow_embed` (flow residual width),
`flow_cond` (conditioning width), `flow_mlp` (flow MLP inner width), `code_levels` (factorised
index logits). Names without a rule in parallel.py are replicated.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmjax.models import layers

# Timestep features follow DiT/MAR: t in [0, 1] is scaled to the 0..1000 range the sinusoid
# frequencies (max period 10000) were designed for.
_T_SCALE = 1000.0
_T_MAX_PERIOD = 10_000.0
_LN_EPS = 1e-6  # LayerNorm epsilon of the flow head (as in DiT/MAR).


def _dense(features, names, dtype, name, zero=False):
    """Dense (with bias) over the last axis; `names` = (input axis, *feature axes).

    Multi-axis features (e.g. (3, width) for AdaLN shift/scale/gate) are one flat [in, prod]
    kernel named (input axis, last feature axis), reshaped after the matmul: DenseGeneral would
    initialise the kernel flat and so clash with a 3-name logical box inside a mesh.
    """
    shape = tuple(features) if isinstance(features, (tuple, list)) else (int(features),)
    init = nn.initializers.zeros if zero else layers.fan_in_init(-2, -1)
    dense = nn.Dense(int(np.prod(shape)), use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                     kernel_init=layers.partitioned(init, (names[0], names[-1])),
                     bias_init=layers.partitioned(nn.initializers.zeros, (names[-1],)),
                     name=name)
    if len(shape) == 1:
        return dense
    return lambda x: dense(x).reshape(*x.shape[:-1], *shape)


class LMHead(nn.Module):
    """Untied LM head: hidden [..., D] -> float32 logits [..., vocab]. (Tied: see the model.)"""

    vocab_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        init = layers.partitioned(layers.fan_in_init(0, 1), ("embed", "vocab"))
        kernel = self.param("kernel", init, (hidden.shape[-1], self.vocab_size), jnp.float32)
        return jnp.dot(hidden.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32)


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of t in [0, 1]: [...] -> float32 [..., dim] (dim even)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(_T_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * _T_SCALE)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (AdaLN supplies shift and scale)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + _LN_EPS)).astype(x.dtype)


class AdaLNBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) = Dense(cond).

    The modulation is zero-initialised, so every block starts as the identity (DiT's adaLN-Zero).
    """

    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        mod = _dense((3, self.width), ("flow_cond", None, "flow_embed"), self.dtype, "modulation",
                     zero=True)(cond)
        shift, scale, gate = mod[..., 0, :], mod[..., 1, :], mod[..., 2, :]
        h = _layer_norm(x) * (1 + scale) + shift
        h = _dense(self.width, ("flow_embed", "flow_mlp"), self.dtype, "mlp_in")(h)
        h = _dense(self.width, ("flow_mlp", "flow_embed"), self.dtype, "mlp_out")(nn.silu(h))
        return x + gate * h


class FlowHead(nn.Module):
    """Velocity v(x_t, t | hidden) for rectified flow on FSQ code vectors.

    hidden [..., D], x_t [..., d], t [...]; leading dims broadcast (e.g. hidden [B, L, D] with
    x_t [K, B, L, d] for K noise samples: the hidden projection is computed once). -> [..., d].
    """

    code_dim: int
    width: int
    depth: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        if x_t.shape[-1] != self.code_dim:
            raise ValueError(f"flow head: x_t has last axis {x_t.shape[-1]}, expected the code "
                             f"dim {self.code_dim} (len(fsq.levels), or fsq.vq_dim for VQ).")
        w = self.width
        cond = _dense(w, ("embed", "flow_cond"), self.dtype, "cond_proj")(hidden)
        t_emb = timestep_features(t, w).astype(self.dtype)
        t_emb = _dense(w, ("flow_cond", "flow_embed"), self.dtype, "t_mlp_in")(t_emb)
        t_emb = _dense(w, ("flow_embed", "flow_cond"), self.dtype, "t_mlp_out")(nn.silu(t_emb))
        cond = nn.silu(cond + t_emb)
        x = _dense(w, ("code", "flow_embed"), self.dtype, "x_proj")(x_t.astype(self.dtype))
        for i in range(self.depth):
            x = AdaLNBlock(w, self.dtype, name=f"block_{i}")(x, cond)
        mod = _dense((2, w), ("flow_cond", None, "flow_embed"), self.dtype, "final_modulation",
                     zero=True)(cond)
        x = _layer_norm(x) * (1 + mod[..., 1, :]) + mod[..., 0, :]
        v = _dense(self.code_dim, ("flow_embed", "code"), self.dtype, "out", zero=True)(x)
        return v.astype(jnp.float32)


class IndexHead(nn.Module):
    """FSQ-index logits: (logits [..., prod(levels)],) or, factorised, one [..., L_i] per channel.

    Always a tuple so callers handle both variants alike (see `index_nll`).
    """

    levels: tuple[int, ...]
    factorized: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> tuple[jax.Array, ...]:
        size = sum(self.levels) if self.factorized else math.prod(self.levels)
        names = ("embed", "code_levels" if self.factorized else "vocab")
        kernel = self.param("kernel", layers.partitioned(layers.fan_in_init(0, 1), names),
                            (hidden.shape[-1], size), jnp.float32)
        logits = jnp.dot(hidden.astype(self.dtype), kernel.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        if not self.factorized:
            return (logits,)
        return tuple(jnp.split(logits, np.cumsum(self.levels)[:-1].tolist(), axis=-1))


def indices_to_digits(indices: jax.Array, levels: Sequence[int]) -> jax.Array:
    """FSQ index [...] -> per-channel level index [..., len(levels)] (mixed radix, first channel
    fastest, as in FSQ.codes_to_indices)."""
    basis = np.cumprod((1,) + tuple(levels)[:-1]).astype(np.int32)
    return (indices[..., None].astype(jnp.int32) // basis) % np.asarray(levels, np.int32)


def digits_to_indices(digits: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Per-channel level indices [..., len(levels)] -> FSQ index [...] (inverse of the above)."""
    basis = np.cumprod((1,) + tuple(levels)[:-1]).astype(np.int32)
    return jnp.sum(digits.astype(jnp.int32) * basis, axis=-1)


def index_nll(logits: tuple[jax.Array, ...], indices: jax.Array,
              levels: Sequence[int]) -> jax.Array:
    """Negative log-likelihood (nats) of FSQ `indices` [...] under `IndexHead` logits -> [...]."""
    if len(logits) == 1:
        targets = indices[..., None]
        parts = [(logits[0], jnp.clip(targets, 0, logits[0].shape[-1] - 1))]
    else:
        digits = indices_to_digits(indices, levels)
        parts = [(lg, digits[..., i:i + 1]) for i, lg in enumerate(logits)]
    nll = 0.0
    for lg, target in parts:
        lg = lg.astype(jnp.float32)
        picked = jnp.take_along_axis(lg, target, axis=-1)[..., 0]
        nll = nll + jax.nn.logsumexp(lg, axis=-1) - picked
    return nll


def index_argmax(logits: tuple[jax.Array, ...], levels: Sequence[int]) -> jax.Array:
    """Most likely FSQ index [...] (per channel when factorised, then combined)."""
    if len(logits) == 1:
        return jnp.argmax(logits[0], axis=-1).astype(jnp.int32)
    digits = jnp.stack([jnp.argmax(lg, axis=-1) for lg in logits], axis=-1)
    return digits_to_indices(digits, levels)
