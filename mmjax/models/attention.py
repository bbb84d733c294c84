"""Attention for the packed multimodal masks, with and without a dense [B, T, S] mask.

The rule (docs/INTERFACES.md, "Attention"; `masks.allowed`):

    allowed(q, k) = seg[q] == seg[k] > 0 and (k <= q or (blk[q] == blk[k] > 0 and bidirectional))
                    or k == q

Every implementation takes the same `MaskSpec` (segment ids, image-block ids and slots of the
queries and of the keys) instead of a materialised mask, so each one can build the mask where it
is cheapest: `reference` builds the dense mask (today's einsum, the numerics every other path is
tested against); `chunked` and `pallas` build it per [block_q, block_k] tile and never hold a
[B, H, T, S] array; `cudnn` and `splash` express what their library can (see their docstrings).

Why `bidirectional` is folded into the spec (image-block ids zeroed when it is off) rather than
passed as a flag: the term `blk[q] == blk[k] > 0` is then simply never true, the spec is a plain
pytree of int arrays (it passes through `nn.remat` and `jit` untouched), and every path
implements one formula.

`kv_len` (decode): keys at slots >= kv_len are empty cache slots. The chunked path then loops only
over the key blocks that hold filled slots (a `while_loop` with a dynamic trip count), so a step
costs O(filled) rather than O(cache size); 'auto' still decodes with the dense reference on
every backend (see `attend`).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmjax.choices import CHOICES
from mmjax.models import masks

IMPLS = CHOICES["model.attention_impl"]

# Finite "minus infinity" (as in layers.attend): fully masked tiles stay NaN-free in any dtype.
_MASK_VALUE = -1e30
# On CPU, 'auto' keeps the dense reference up to this many query x key pairs (512 x 512: one
# 512-tile, the same work either way) and switches to 'chunked' above, where it was faster in
# bench/results/attention_memory.json (training step at L=1024: 181 vs 360 ms; L=2048: 0.76 vs
# 5.4 s on a loaded 2-core CPU) besides using 22 MiB of temp memory instead of 65 / 259 MiB.
_CPU_DENSE_MAX_PAIRS = 512 * 512


class MaskSpec(NamedTuple):
    """What the mask is made of: queries [B, T] and keys [B, S] (int32 each).

    `*_slot` are absolute sequence / cache positions (causality), not RoPE positions. Image-block
    ids are already zero where bidirectional context attention is off. `kv_len` (int32 [] or None)
    bounds the filled key slots during decode.
    """

    q_segment: jax.Array
    q_block: jax.Array
    q_slot: jax.Array
    k_segment: jax.Array
    k_block: jax.Array
    k_slot: jax.Array
    kv_len: jax.Array | None = None


def _slots(batch: int, start, length: int) -> jax.Array:
    row = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    return jnp.broadcast_to(row, (batch, length))


def train_spec(segment_ids: jax.Array, image_block: jax.Array, bidirectional: bool) -> MaskSpec:
    """Spec of a packed training batch (queries = keys = the whole sequence)."""
    masks._check_same_shape(segment_ids=segment_ids, image_block=image_block)
    seg = segment_ids.astype(jnp.int32)
    blk = image_block.astype(jnp.int32) if bidirectional else jnp.zeros_like(seg)
    slots = _slots(seg.shape[0], 0, seg.shape[1])
    return MaskSpec(seg, blk, slots, seg, blk, slots)


def decode_spec(q_segment_ids, q_image_block, start, cache_segment_ids, cache_image_block,
                bidirectional: bool) -> MaskSpec:
    """Spec of T new positions at cache slots start.. against a cache of S slots (the cache ids
    already hold the chunk's own entries; see masks.decode_attention_mask)."""
    masks._check_same_shape(q_segment_ids=q_segment_ids, q_image_block=q_image_block)
    masks._check_same_shape(cache_segment_ids=cache_segment_ids,
                            cache_image_block=cache_image_block)
    qs, ks = q_segment_ids.astype(jnp.int32), cache_segment_ids.astype(jnp.int32)
    qb = q_image_block.astype(jnp.int32) if bidirectional else jnp.zeros_like(qs)
    kb = cache_image_block.astype(jnp.int32) if bidirectional else jnp.zeros_like(ks)
    start = jnp.asarray(start, jnp.int32)
    return MaskSpec(qs, qb, _slots(qs.shape[0], start, qs.shape[1]), ks, kb,
                    _slots(ks.shape[0], 0, ks.shape[1]), start + qs.shape[1])


def dense_mask(spec: MaskSpec) -> jax.Array:
    """The spec's mask as bool [B, T, S] (what `reference` and `cudnn` consume)."""
    return masks.allowed(spec.q_segment, spec.q_block, spec.q_slot, spec.k_segment, spec.k_block,
                         spec.k_slot, True)


def resolve_impl(impl: str, q_len: int, kv_len: int, dtype=jnp.float32, head_dim: int = 64,
                 backend: str | None = None) -> str:
    """'auto' -> the fused path of the backend (default: jax's default backend).

    GPU: 'cudnn' for 16-bit inputs with a head dim cuDNN's flash attention takes (a multiple of
    8, at most 128), else 'pallas' (the mask built in-kernel). On one H200, training step of
    4 x 1024 tokens, 16 heads x 128 (bench/results/accelerator/attention.json): cudnn 1.19 ms,
    reference 1.44, pallas 3.29, chunked 5.22, all within bf16 rounding of the reference
    gradients; at 8192 tokens cudnn's temp memory is 1.0 GiB against the reference's 40 GiB
    (its bool mask [B, 1, T, S] is one byte per pair; the logits never exist).
    TPU: 'splash'. CPU: 'chunked' for long sequences, 'reference' for short ones where the
    dense einsum is faster (bench/attention_memory.py). Decode (kv_len given to `attend`) uses
    'reference'."""
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "gpu":
        cudnn_ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                    and head_dim % 8 == 0 and head_dim <= 128)
        return "cudnn" if cudnn_ok else "pallas"
    if backend == "tpu":
        return "splash"
    return "reference" if q_len * kv_len <= _CPU_DENSE_MAX_PAIRS else "chunked"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, impl: str = "reference",
           block_size: int = 512) -> jax.Array:
    """Masked softmax attention. q [B, T, H, Dh], k/v [B, S, H, Dh] -> [B, T, H, Dh] (q's dtype).

    Logits and softmax in float32 on every path; every query may attend to itself, so no row is
    empty. `block_size` is the query/key tile of the blockwise paths (`chunked`, `pallas`).
    """
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}: must be one of {', '.join(IMPLS)}.")
    if impl == "auto" and spec.kv_len is not None:
        # Decode: the dense pass over the updated cache. (The model's decode runs 'auto' as
        # kv_cache.attend_then_write instead, which reads the cache without copying it.) A while
        # loop over filled blocks made XLA:CPU copy the donated cache every step (loop-carried
        # operands), which cost more than the empty slots it skips (bench/decode.py; see the
        # issue-14 report); 'chunked' stays selectable for caches much larger than their filled
        # part.
        impl = "reference"
    impl = resolve_impl(impl, q.shape[1], k.shape[1], q.dtype, q.shape[-1])
    if impl == "reference":
        return reference_attend(q, k, v, dense_mask(spec))
    if impl == "chunked":
        if spec.kv_len is not None:  # decode: forward only, loop over the filled blocks only
            return _chunked_forward(q, k, v, spec, block_size, block_size)[0]
        return chunked_attend(q, k, v, spec, block_size, block_size)
    if impl == "cudnn":
        return cudnn_attend(q, k, v, spec)
    if impl == "pallas":
        from mmjax.models import attention_pallas
        on_cpu = jax.default_backend() == "cpu"
        # A GPU program holds a [block_q, Dh] accumulator and [block_q, block_k] logits in
        # registers: 128 is the largest tile jax's own Triton attention kernel defaults to.
        block = block_size if on_cpu else min(block_size, 128)
        return attention_pallas.pallas_attend(q, k, v, spec, block, block, interpret=on_cpu)
    from mmjax.models import attention_splash
    return attention_splash.splash_attend(q, k, v, spec, jax.default_backend() == "cpu")


# ---- reference ---------------------------------------------------------------------------------
def reference_attend(q, k, v, mask):
    """Dense einsum attention with a bool [B, T, S] mask (unchanged from layers.attend)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


# ---- cuDNN (jax.nn.dot_product_attention) ------------------------------------------------------
def cudnn_attend(q, k, v, spec: MaskSpec, implementation: str | None = "cudnn"):
    """jax.nn.dot_product_attention with the spec's mask.

    jax 0.10.2's signature has `is_causal`, per-row `query_seq_lengths` / `key_value_seq_lengths`
    and `local_window_size`, but no segment ids and nothing data-dependent: packed segments and
    bidirectional context-image blocks can only be passed as a dense `mask` [B, 1, T, S] (bool,
    one byte per pair and no head axis: 1/(4H) of the reference's float32 logits, which cuDNN
    then never materialises). cuDNN needs float16/bfloat16 and is GPU-only; `implementation=None`
    runs the same call through XLA (what the CPU tests compare).
    """
    mask = dense_mask(spec)[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


# ---- chunked (pure JAX, online softmax, flash-attention style custom VJP) ---------------------
def _pad_axis1(x, multiple: int, value):
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _prepare(q, k, v, spec: MaskSpec, block_q: int, block_k: int):
    """Pads T and S to whole blocks. Padded queries (slot -1) and keys (segment 0, slot -2) match
    nothing real: padded keys get zero weight, padded query rows are cut off afterwards."""
    bq, bk = min(block_q, q.shape[1]), min(block_k, k.shape[1])
    qs = (_pad_axis1(q, bq, 0), _pad_axis1(spec.q_segment, bq, 0),
          _pad_axis1(spec.q_block, bq, 0), _pad_axis1(spec.q_slot, bq, -1))
    ks = (_pad_axis1(k, bk, 0), _pad_axis1(v, bk, 0), _pad_axis1(spec.k_segment, bk, 0),
          _pad_axis1(spec.k_block, bk, 0), _pad_axis1(spec.k_slot, bk, -2))
    return bq, bk, qs, ks


def _key_block(ks, j, bk: int):
    return tuple(jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in ks)


def _num_key_blocks(spec: MaskSpec, padded_s: int, bk: int):
    """Static block count, or (decode) only the blocks holding filled slots (dynamic)."""
    n = padded_s // bk
    if spec.kv_len is None:
        return n
    return jnp.minimum((spec.kv_len + bk - 1) // bk, n)


def _chunked_forward(q, k, v, spec: MaskSpec, block_q: int, block_k: int):
    """-> (o [B, T, H, Dh] in q's dtype, lse [B, H, T] float32). Query blocks run under
    `lax.map`, key blocks under a `fori_loop` that skips tiles with no allowed pair."""
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5
    bq, bk, qs, ks = _prepare(q, k, v, spec, block_q, block_k)
    n_k = _num_key_blocks(spec, ks[0].shape[1], bk)
    b, tp, h, dh = qs[0].shape

    def one_query_block(i):
        qi, qseg, qblk, qslot = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1) for x in qs)

        def step(j, carry):
            kj, vj, kseg, kblk, kslot = _key_block(ks, j, bk)
            mask = masks.allowed(qseg, qblk, qslot, kseg, kblk, kslot, True)[:, None]

            def update(carry):
                m, l, acc = carry
                s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj,
                               preferred_element_type=jnp.float32) * scale
                s = jnp.where(mask, s, _MASK_VALUE)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum(
                    "bhqk,bkhd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc

            return jax.lax.cond(mask.any(), update, lambda c: c, carry)

        init = (jnp.full((b, h, bq), _MASK_VALUE, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, dh), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_k, step, init)
        safe = jnp.where(l > 0, l, 1.0)  # only padded query rows have l == 0
        o = (acc / safe[..., None]).transpose(0, 2, 1, 3)
        return o.astype(q.dtype), m + jnp.log(safe)

    o, lse = jax.lax.map(one_query_block, jnp.arange(tp // bq))  # [nq, B, bq, H, Dh], [nq,B,H,bq]
    o = jnp.moveaxis(o, 0, 1).reshape(b, tp, h, dh)[:, :t]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, tp)[:, :, :t]
    return o, lse


def chunked_backward(q, k, v, spec: MaskSpec, o, lse, do, block_q: int, block_k: int):
    """Flash-attention-2 backward from the saved (o, lse): recomputes each tile's probabilities,
    so no [B, H, T, S] array exists here either. -> (dq, dk, dv) in the input dtypes."""
    t, s_len = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5
    bq, bk, qs, ks = _prepare(q, k, v, spec, block_q, block_k)
    b, tp, h, dh = qs[0].shape
    sp = ks[0].shape[1]
    do_p = _pad_axis1(do, bq, 0)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)))
    delta_p = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - t)))
    n_k = sp // bk

    def one_query_block(carry, i):
        dk, dv = carry
        qi, qseg, qblk, qslot = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1) for x in qs)
        doi = jax.lax.dynamic_slice_in_dim(do_p, i * bq, bq, axis=1)
        lsei, deltai = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)
                        for x in (lse_p, delta_p))

        def step(j, inner):
            dq, dk, dv = inner
            kj, vj, kseg, kblk, kslot = _key_block(ks, j, bk)
            mask = masks.allowed(qseg, qblk, qslot, kseg, kblk, kslot, True)[:, None]

            def update(inner):
                dq, dk, dv = inner
                s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj,
                               preferred_element_type=jnp.float32) * scale
                p = jnp.where(mask, jnp.exp(s - lsei[..., None]), 0.0)
                dv_j = jnp.einsum("bhqk,bqhd->bkhd", p, doi.astype(jnp.float32))
                dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - deltai[..., None]) * scale
                dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, kj.astype(jnp.float32))
                dk_j = jnp.einsum("bhqk,bqhd->bkhd", ds, qi.astype(jnp.float32))
                add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                    acc, jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, axis=1) + x, j * bk, axis=1)
                return dq, add(dk, dk_j), add(dv, dv_j)

            return jax.lax.cond(mask.any(), update, lambda c: c, inner)

        dq0 = jnp.zeros((b, bq, h, dh), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, n_k, step, (dq0, dk, dv))
        return (dk, dv), dq

    zeros = jnp.zeros((b, sp, h, dh), jnp.float32)
    (dk, dv), dq = jax.lax.scan(one_query_block, (zeros, zeros), jnp.arange(tp // bq))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, tp, h, dh)[:, :t]
    return dq.astype(q.dtype), dk[:, :s_len].astype(k.dtype), dv[:, :s_len].astype(v.dtype)


def _zero_cotangent(spec: MaskSpec):
    """Integer spec arrays get float0 cotangents."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunked_attend(q, k, v, spec: MaskSpec, block_q: int = 512, block_k: int = 512):
    """Memory-efficient attention: online softmax over [block_q, block_k] tiles, mask built per
    tile from the spec, tiles with no allowed pair skipped (about half of them under a causal
    mask). Forward and backward both hold O(B H block_q block_k) intermediates."""
    return _chunked_forward(q, k, v, spec, block_q, block_k)[0]


def _chunked_fwd(q, k, v, spec, block_q, block_k):
    o, lse = _chunked_forward(q, k, v, spec, block_q, block_k)
    return o, (q, k, v, spec, o, lse)


def _chunked_bwd(block_q, block_k, res, do):
    q, k, v, spec, o, lse = res
    dq, dk, dv = chunked_backward(q, k, v, spec, o, lse, do, block_q, block_k)
    return dq, dk, dv, _zero_cotangent(spec)


chunked_attend.defvjp(_chunked_fwd, _chunked_bwd)


def padded_len(length: int, block: int) -> int:
    """Length rounded up to whole blocks (what the blockwise paths compute over)."""
    b = min(block, length)
    return math.ceil(length / b) * b
