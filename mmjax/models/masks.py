"""Attention masks for packed multimodal sequences (docs/INTERFACES.md, "Attention").

    allowed(q, k) = seg[q] == seg[k] > 0 and (k <= q or (blk[q] == blk[k] > 0 and bidirectional))
                    or k == q

Why one rule for training and decoding: a KV cache is the same sequence seen through slots, so
the decode mask is this rule with the query's slot compared to each cached slot. Keeping a single
implementation (`allowed`) is what makes cached decoding agree with the full forward pass.

Why bidirectional only inside *context* image blocks: an image being generated token by token
must stay causal (each token is predicted from the ones before it), but an image given as context
(captioning) is known in full, so its tokens may see each other. The packer marks only context
images with `image_block > 0`.

No position with a loss may see its own target (token i+1). Causality guarantees that outside
context blocks; inside one it holds as long as the packer never puts a loss on a block position
whose next token is in the same block (generated images are never context, and a context image's
last token predicts `<eoi>`, which lies outside the block). tests/test_masks.py checks this on the
layouts of docs/INTERFACES.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def allowed(q_segment: jax.Array, q_block: jax.Array, q_slot: jax.Array,
            k_segment: jax.Array, k_block: jax.Array, k_slot: jax.Array,
            bidirectional: bool) -> jax.Array:
    """The rule above for queries [B, T] against keys [B, S] -> bool [B, T, S].

    `*_slot` are the absolute sequence (or cache) positions used for causality; they are *not*
    the RoPE positions (which restart at 0 in every packed document).
    """
    qs, ks = q_segment[:, :, None], k_segment[:, None, :]
    qb, kb = q_block[:, :, None], k_block[:, None, :]
    qi, ki = q_slot[:, :, None], k_slot[:, None, :]
    visible = ki <= qi
    if bidirectional:
        visible = visible | ((qb == kb) & (qb > 0))
    return ((qs == ks) & (qs > 0) & visible) | (qi == ki)


def attention_mask(segment_ids: jax.Array, image_block: jax.Array,
                   bidirectional: bool) -> jax.Array:
    """Training mask of a packed batch: segment_ids, image_block [B, L] -> bool [B, L, L]."""
    _check_same_shape(segment_ids=segment_ids, image_block=image_block)
    batch, length = segment_ids.shape
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return allowed(segment_ids, image_block, slots, segment_ids, image_block, slots,
                   bidirectional)


def decode_attention_mask(q_segment_ids: jax.Array, q_image_block: jax.Array, start: jax.Array,
                          cache_segment_ids: jax.Array, cache_image_block: jax.Array,
                          bidirectional: bool) -> jax.Array:
    """Mask of a chunk of T new positions (occupying cache slots start..start+T-1) against a
    cache of S slots -> bool [B, T, S].

    `cache_segment_ids` / `cache_image_block` [B, S] must already hold the chunk's own entries.
    Empty slots have segment 0, so only a padding query's own slot ever matches them.
    A context image block must lie inside one chunk (prefill): keys of later chunks are not
    visible to positions already decoded, exactly as in a causal cache.
    """
    _check_same_shape(q_segment_ids=q_segment_ids, q_image_block=q_image_block)
    _check_same_shape(cache_segment_ids=cache_segment_ids, cache_image_block=cache_image_block)
    batch, chunk = q_segment_ids.shape
    size = cache_segment_ids.shape[1]
    q_slots = jnp.asarray(start, jnp.int32) + jnp.arange(chunk, dtype=jnp.int32)
    q_slots = jnp.broadcast_to(q_slots, (batch, chunk))
    k_slots = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
    return allowed(q_segment_ids, q_image_block, q_slots, cache_segment_ids, cache_image_block,
                   k_slots, bidirectional)


def _check_same_shape(**arrays) -> None:
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"attention masks need matching [batch, length] arrays, got {shapes}.")
