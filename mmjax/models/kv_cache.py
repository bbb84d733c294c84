"""A decode chunk's attention against the KV cache, and the cache update, without copying it.

Layout: the cache is head-major, `k` / `v` [B, H, S, Dh] (`init_cache`). Why: attention is a
batched matmul over (batch, head); with the slot-major [B, S, H, Dh] layout XLA:CPU transposes
the whole cache of every layer to head-major before each step's two dots (read + write of all of
K and V per token, which is what made a step at 1024 cached positions cost ~1.8x one at 64).

Order: attend first, write second, and make the write data-depend on the attention (`after`).
The chunk's queries attend to the cache's OLD slots (those before `start`, read-only) and to the
chunk's own keys/values (passed directly), with one softmax over both; only then are the chunk's
keys/values written into the cache. Why: the write is a dynamic-update-slice into the donated
cache buffer, which runs in place only if every read of the old buffer provably comes first.
Reading the updated cache instead gives the update two consumers (the attention and the returned
cache), and XLA copies the cache to keep both. The result equals attention over the updated
cache (the same logits, the same softmax; only the summation order of the two parts differs).
Check: the compiled step has no copy of a cache buffer (tests/test_kv_cache.py).

Only single-position steps with model.attention_impl "auto" run this way (`dense_old_and_own`);
a multi-position chunk (prefill) and the other impls ('reference', 'chunked', ...) write first
and read the updated cache in slot-major order (`attention.attend`'s inputs), so tests compare
both against the reference formula.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.models import attention, masks


def to_slot_major(x: jax.Array) -> jax.Array:
    """Cache [B, H, S, Dh] -> [B, S, H, Dh] (the layout `attention.attend` takes)."""
    return x.transpose(0, 2, 1, 3)


def write(cache: jax.Array, x: jax.Array, start: jax.Array) -> jax.Array:
    """Writes a chunk x [B, T, H, Dh] into the cache [B, H, S, Dh] at slots start.. (in place
    when the cache is donated and this is its only consumer)."""
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(cache, to_slot_major(x).astype(cache.dtype),
                                        (zero, zero, jnp.asarray(start, jnp.int32), zero))


def attend_then_write(q, k, v, cache_k, cache_v, spec: attention.MaskSpec, impl: str,
                      block_size: int):
    """q/k/v [B, T, H, Dh] of a chunk at slots spec.kv_len - T.. against the cache [B, H, S, Dh].

    -> (o [B, T, H, Dh] in q's dtype, (cache_k, cache_v) with the chunk written).
    `spec` is `attention.decode_spec`'s (its key ids already hold the chunk's own entries).
    """
    t = q.shape[1]
    start = spec.kv_len - t
    if impl != "auto" or t > 1:
        # The other impls read the updated cache in their own layout. So does a chunk of
        # T > 1 (a prefill): one pass over the S slots instead of the old slots plus its own T
        # keys (S + T per query; 1.7x the time of a 1024-position prefill at demo size), and a
        # copy of the cache is small next to T x S logits.
        cache_k, cache_v = write(cache_k, k, start), write(cache_v, v, start)
        o = attention.attend(q, to_slot_major(cache_k).astype(q.dtype),
                             to_slot_major(cache_v).astype(q.dtype), spec, impl, block_size)
        return o, (cache_k, cache_v)
    o = dense_old_and_own(q, k, v, cache_k, cache_v, spec, start)
    start = after(start, o)
    return o, (write(cache_k, k, start), write(cache_v, v, start))


def after(start: jax.Array, o: jax.Array) -> jax.Array:
    """`start`, unchanged, as a value computed from `o` (the attention output).

    Why: the write at `start` runs in place on the donated cache only if XLA can prove every read
    of the old cache (the dots `o` is made of) happens before it. XLA's copy insertion orders ops
    by data dependence alone, and XLA:CPU drops `lax.optimization_barrier` before it runs, so
    without this dependency it copies each cache buffer twice per step (2 x 4.3 MB per token at
    demo size, 1057 slots). `sum > inf` is False for every float, NaN and inf included.
    """
    return start + (o.sum(dtype=jnp.float32) > jnp.inf).astype(start.dtype)


def dense_old_and_own(q, k, v, cache_k, cache_v, spec: attention.MaskSpec, start) -> jax.Array:
    """Softmax attention over the cache's slots < start plus the chunk's own T keys (one
    normaliser for both parts). Logits and softmax in float32, as `attention.reference_attend`."""
    scale = q.shape[-1] ** -0.5
    qh = q.transpose(0, 2, 1, 3)  # [B, H, T, Dh] (small)
    old_mask = attention.dense_mask(spec) & (spec.k_slot < start)[:, None, :]  # [B, T, S]
    own_mask = masks.allowed(spec.q_segment, spec.q_block, spec.q_slot, spec.q_segment,
                             spec.q_block, spec.q_slot, True)  # [B, T, T]
    s_old = jnp.einsum("bhtd,bhsd->bhts", qh, cache_k.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale
    s_own = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    s_old = jnp.where(old_mask[:, None], s_old, attention._MASK_VALUE)  # noqa: SLF001
    s_own = jnp.where(own_mask[:, None], s_own, attention._MASK_VALUE)  # noqa: SLF001
    m = jnp.maximum(s_old.max(-1), s_own.max(-1))[..., None]  # finite: every query sees itself
    p_old = jnp.exp(s_old - m)
    p_own = jnp.exp(s_own - m)
    denom = p_old.sum(-1) + p_own.sum(-1)  # [B, H, T]
    o = (jnp.einsum("bhts,bhsd->bhtd", p_old.astype(v.dtype), cache_v.astype(v.dtype),
                    preferred_element_type=jnp.float32)
         + jnp.einsum("bhts,bshd->bhtd", p_own.astype(v.dtype), v,
                      preferred_element_type=jnp.float32))
    o = o / denom[..., None]
    return o.transpose(0, 2, 1, 3).astype(q.dtype)
