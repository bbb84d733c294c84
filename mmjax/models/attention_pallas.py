"""Pallas flash-attention forward that builds the packed multimodal mask inside the kernel.

Why a kernel of our own: jax's bundled Pallas attention kernels take causal + segment ids, but
not the bidirectional context-image blocks of docs/INTERFACES.md, and cuDNN takes neither without
a dense mask. Here every program (one batch row, one head, one query block) loads its queries'
segment / image-block / slot ids once, and for each key block compares them with the keys' ids
(`masks.allowed`'s formula, element for element), so no mask ever exists outside registers.

Scope, honestly: the forward kernel is tested in Pallas interpret mode on CPU (tests/
test_attention.py); on a GPU (Triton lowering) it has not been run here. The backward is
attention.chunked_backward (pure JAX, flash-attention-2 recompute from the kernel's saved
log-sum-exp), so gradients never materialise [B, H, T, S] either. Key blocks are not skipped
inside the kernel (a causal mask would let it skip about half of them); the loop runs over all
key blocks of the row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmjax.models import attention

_MASK_VALUE = -1e30


def _kernel(q_ref, k_ref, v_ref, qs_ref, qb_ref, qi_ref, ks_ref, kb_ref, ki_ref, o_ref, lse_ref,
            *, scale: float, block_k: int, num_k_blocks: int):
    q = q_ref[...]  # [bq, Dh] in the input dtype: the dots run on tensor cores, f32 accumulate
    qs, qb, qi = qs_ref[...][:, None], qb_ref[...][:, None], qi_ref[...][:, None]  # [bq, 1]
    bq, dh = q.shape

    def body(j, carry):
        m, l, acc = carry
        span = pl.ds(j * block_k, block_k)
        k = k_ref[span, :]  # [bk, Dh]
        v = v_ref[span, :]
        ks, kb, ki = ks_ref[span][None, :], kb_ref[span][None, :], ki_ref[span][None, :]
        mask = ((qs == ks) & (qs > 0) & ((ki <= qi) | ((qb == kb) & (qb > 0)))) | (qi == ki)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=1), acc * corr[:, None] + pv

    init = (jnp.full((bq,), _MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, dh), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_k_blocks, body, init)
    safe = jnp.where(l > 0, l, 1.0)  # only padded query rows have l == 0
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(safe)


def _forward(q, k, v, spec, block_q: int, block_k: int, interpret: bool):
    """-> (o [B, T, H, Dh], lse [B, H, T] float32), like attention._chunked_forward."""
    t = q.shape[1]
    bq, bk, (qp, qs, qb, qi), (kp, vp, ks, kb, ki) = attention._prepare(q, k, v, spec, block_q,
                                                                        block_k)
    b, tp, h, dh = qp.shape
    sp = kp.shape[1]
    kernel = functools.partial(_kernel, scale=dh ** -0.5, block_k=bk, num_k_blocks=sp // bk)
    q_spec = pl.BlockSpec((None, bq, None, dh), lambda bi, hi, i: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, sp, None, dh), lambda bi, hi, i: (bi, 0, hi, 0))
    q_ids = pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i))
    k_ids = pl.BlockSpec((None, sp), lambda bi, hi, i: (bi, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, h, tp // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_ids, q_ids, q_ids, k_ids, k_ids, k_ids],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
        interpret=interpret,
        name="mmjax_packed_attention",
    )(qp, kp, vp, qs, qb, qi, ks, kb, ki)
    return o[:, :t], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def pallas_attend(q, k, v, spec, block_q: int = 512, block_k: int = 512, interpret: bool = False):
    """Packed-mask attention with the Pallas forward kernel (see the module docstring).
    q [B, T, H, Dh], k/v [B, S, H, Dh], spec: attention.MaskSpec -> [B, T, H, Dh]."""
    return _forward(q, k, v, spec, block_q, block_k, interpret)[0]


def _fwd(q, k, v, spec, block_q, block_k, interpret):
    o, lse = _forward(q, k, v, spec, block_q, block_k, interpret)
    return o, (q, k, v, spec, o, lse)


def _bwd(block_q, block_k, interpret, res, do):
    q, k, v, spec, o, lse = res
    dq, dk, dv = attention.chunked_backward(q, k, v, spec, o, lse, do, block_q, block_k)
    return dq, dk, dv, attention._zero_cotangent(spec)


pallas_attend.defvjp(_fwd, _bwd)
