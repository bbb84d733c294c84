"""TPU splash attention for the packed multimodal mask (jax.experimental.pallas.ops.tpu).

Splash takes a *static* mask (a function of positions only, used to skip whole blocks) AND-ed
with segment-id equality. The packed rule is not of that form (the bidirectional part depends on
the data's image blocks), but it splits into two disjoint sets that are:

    A = causal (k <= q) and same segment          -> CausalMask, segment ids = seg (padding: a
                                                     unique negative id per slot, so it sees only
                                                     itself)
    B = strictly after (k > q) and same image block -> LocalMask(window (-1, None)), segment ids =
                                                     image block (non-block slots: unique
                                                     negative ids, so they see nothing)

(an image block lies inside one segment, so A and B together are exactly `masks.allowed`).
Two splash calls give each set's output and log-sum-exp; the union's softmax is their
lse-weighted merge. Rows with an empty B (not in a block, or a block's last slot) get zero weight
from B explicitly, so no value of a fully masked splash row is ever used.

The backward is attention.chunked_backward from the merged (o, lse) (exact, pure JAX, no
[B, H, T, S]); a TPU run would want splash's own backward kernels instead.

Tested on CPU only, in Pallas interpret mode (tests/test_attention.py: values and gradients
equal the reference); no TPU was available, so the compiled TPU kernels are untested. T and S
must be multiples of the splash block size (128).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.models import attention


def split_sets(spec: attention.MaskSpec):
    """Segment ids of the two splash calls -> ((qA, kA), (qB, kB), has_B [B, T] bool).

    Pure and testable on CPU: tests check that A | B == masks.allowed and A & B == empty.
    """
    def unique_negative(ids, slot):
        return jnp.where(ids > 0, ids, -(slot + 1))

    qa = unique_negative(spec.q_segment, spec.q_slot)
    ka = unique_negative(spec.k_segment, spec.k_slot)
    qb = unique_negative(spec.q_block, spec.q_slot)
    kb = unique_negative(spec.k_block, spec.k_slot)
    # B is non-empty for a query iff its block continues at the next key slot (blocks are
    # contiguous runs, masks.py); training layout: keys are the queries.
    nxt = jnp.concatenate([spec.k_block[:, 1:], jnp.zeros_like(spec.k_block[:, :1])], axis=1)
    has_b = (spec.q_block > 0) & (jnp.take_along_axis(nxt, jnp.clip(spec.q_slot, 0), 1)
                                  == spec.q_block)
    return (qa, ka), (qb, kb), has_b


def set_masks(spec: attention.MaskSpec):
    """The dense masks of sets A and B (for tests): bool [B, T, S] each."""
    (qa, ka), (qb, kb), _ = split_sets(spec)
    qi, ki = spec.q_slot[:, :, None], spec.k_slot[:, None, :]
    a = (qa[:, :, None] == ka[:, None, :]) & (ki <= qi)
    b = (qb[:, :, None] == kb[:, None, :]) & (ki > qi)
    return a, b


def _splash_forward(q, k, v, spec: attention.MaskSpec, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if spec.kv_len is not None:
        raise ValueError("attention_impl='splash' is for training; decode uses 'chunked'.")
    b, t, h, dh = q.shape
    s = k.shape[1]
    shape = (t, s)
    causal = sa.MultiHeadMask([sa.CausalMask(shape) for _ in range(h)])
    after = sa.MultiHeadMask([sa.LocalMask(shape, (-1, None), 0) for _ in range(h)])
    kernel_a = sa.make_splash_mha_single_device(causal, save_residuals=True, interpret=interpret)
    kernel_b = sa.make_splash_mha_single_device(after, save_residuals=True, interpret=interpret)
    (qa, ka), (qb, kb), has_b = split_sets(spec)
    scale = dh ** -0.5
    # splash wants [H, T, Dh] per example and does not scale the logits itself.
    qh = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one(kernel, qx, kx, vx, qs, ks):
        out, (lse,) = kernel(qx, kx, vx, segment_ids=sa.SegmentIds(q=qs, kv=ks))
        return out, lse

    o_a, lse_a = jax.vmap(functools.partial(one, kernel_a))(qh, kh, vh, qa, ka)
    o_b, lse_b = jax.vmap(functools.partial(one, kernel_b))(qh, kh, vh, qb, kb)
    lse_b = jnp.where(has_b[:, None, :], lse_b.astype(jnp.float32), -jnp.inf)
    lse_a = lse_a.astype(jnp.float32)
    lse = jnp.logaddexp(lse_a, lse_b)
    w_a = jnp.exp(lse_a - lse)[..., None]
    w_b = jnp.where(has_b[:, None, :, None], jnp.exp(lse_b - lse)[..., None], 0.0)
    o = w_a * o_a.astype(jnp.float32) + w_b * o_b.astype(jnp.float32)
    return o.transpose(0, 2, 1, 3).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def splash_attend(q, k, v, spec, interpret: bool = False):
    """Packed-mask attention with two TPU splash calls (see the module docstring);
    `interpret` runs the kernels in Pallas interpret mode (CPU tests)."""
    return _splash_forward(q, k, v, spec, interpret)[0]


def _fwd(q, k, v, spec, interpret):
    o, lse = _splash_forward(q, k, v, spec, interpret)
    return o, (q, k, v, spec, o, lse)


def _bwd(interpret, res, do):
    q, k, v, spec, o, lse = res
    dq, dk, dv = attention.chunked_backward(q, k, v, spec, o, lse, do, 512, 512)
    return dq, dk, dv, attention._zero_cotangent(spec)


splash_attend.defvjp(_fwd, _bwd)
