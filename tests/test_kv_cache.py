"""models/kv_cache.py: a decode chunk's attention against a head-major cache, then the write.
Values == the reference formula over the updated cache for every impl and for the single-step
path (dense_old_and_own): a partly filled cache whose empty slots hold junk, rows with different
layouts and padding, single steps and a multi-position chunk. The write touches only the chunk's
slots, and the compiled, donated decode step of a two-modality model updates the cache in place
(no copy of a cache buffer, every cache leaf aliased to its output)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import attention, kv_cache
from mmjax.models.model import MultimodalLM, init_cache
from test_attention import B, DH, H, qkv, random_layout
from test_masks import packed_batch
from test_mot import LEVELS, VOCAB, build, tiny_cfg

SIZE = 40


def decode_case(filled: int, t: int, seed: int):
    """A chunk of t positions at slots filled-t.. of a SIZE-slot cache [B, H, S, Dh] of junk
    (every slot non-zero, including the chunk's own and the empty ones; empty slots segment 0)."""
    rng = np.random.default_rng(seed)
    seg, blk = random_layout(rng, B, SIZE)
    seg[:, filled:] = 0
    blk[:, filled:] = 0
    start = filled - t
    q, k, v = qkv(rng, t=t)
    cache_k, cache_v = (jnp.asarray(rng.normal(size=(B, H, SIZE, DH)), jnp.float32)
                        for _ in range(2))
    spec = attention.decode_spec(jnp.asarray(seg[:, start:filled]),
                                 jnp.asarray(blk[:, start:filled]), start, jnp.asarray(seg),
                                 jnp.asarray(blk), True)
    return dict(q=q, k=k, v=v, cache_k=cache_k, cache_v=cache_v, spec=spec, start=start)


@pytest.mark.parametrize("filled,t", [(5, 1), (23, 1), (SIZE, 1), (16, 8)])
@pytest.mark.parametrize("impl", ["auto", "reference", "chunked"])
def test_attend_then_write_equals_reference_over_the_updated_cache(filled, t, impl):
    c = decode_case(filled, t, seed=filled + t)
    o, (new_k, new_v) = jax.jit(lambda *a: kv_cache.attend_then_write(
        *a, c["spec"], impl, 8))(c["q"], c["k"], c["v"], c["cache_k"], c["cache_v"])
    start = c["start"]
    for new, old, chunk in ((new_k, c["cache_k"], c["k"]), (new_v, c["cache_v"], c["v"])):
        want = np.asarray(old).copy()
        want[:, :, start:start + t] = np.asarray(chunk).transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(np.asarray(new), want)  # only the chunk's slots change
    mask = attention.dense_mask(c["spec"])
    want = attention.reference_attend(c["q"], kv_cache.to_slot_major(new_k),
                                      kv_cache.to_slot_major(new_v), mask)
    np.testing.assert_allclose(np.asarray(o), np.asarray(want), atol=2e-6)
    if impl == "auto":  # the single-step path, also on a multi-position chunk
        direct = kv_cache.dense_old_and_own(c["q"], c["k"], c["v"], c["cache_k"], c["cache_v"],
                                            c["spec"], start)
        np.testing.assert_allclose(np.asarray(direct), np.asarray(want), atol=2e-6)
    # The cache's junk is in reach of a wrong mask: slots >= start (old values there included).
    assert not np.asarray(mask[..., filled:]).any() and np.asarray(mask).any(-1).all()


def test_attend_then_write_sees_the_chunk_not_the_old_slots_it_overwrites():
    """The chunk's slots hold junk before the write; dense_old_and_own must use the chunk's own
    k/v for them, not the cache's."""
    c = decode_case(16, 8, seed=3)
    got = kv_cache.dense_old_and_own(c["q"], c["k"], c["v"], c["cache_k"], c["cache_v"],
                                     c["spec"], c["start"])
    stale = attention.reference_attend(c["q"], kv_cache.to_slot_major(c["cache_k"]),
                                       kv_cache.to_slot_major(c["cache_v"]),
                                       attention.dense_mask(c["spec"]))
    assert not np.allclose(np.asarray(got), np.asarray(stale), atol=1e-3)


def cache_copies(hlo: str, shape) -> list[str]:
    """The copy instructions of an f32 buffer of `shape` in compiled HLO text."""
    dims = ",".join(map(str, shape))
    return re.findall(rf"= f32\[{dims}\]\{{[0-9,]*\}} copy\(.*", hlo)


def test_compiled_decode_step_updates_the_donated_cache_in_place():
    """One jitted single-position step (cache donated, as bench/decode.py and the samplers run
    it) of a two-modality model with a half-filled cache: no copy of any cache buffer, and every
    cache leaf's output is aliased to its input."""
    size = 24
    cfg = tiny_cfg(num_modalities=2, max_seq_len=size)
    batch = packed_batch([[("t2i", 3, 6), ("t2i", 1, 4)], [("i2t", 2, 5), ("t2i", 0, 3)]], size,
                         VOCAB, LEVELS, seed=1)
    model, params = build(cfg, batch)
    decode = jax.jit(lambda p, chunk, cache: model.apply({"params": p}, chunk, cache,
                                                         method=MultimodalLM.decode),
                     donate_argnums=2)
    cache = init_cache(cfg, 2)
    keys = ("tokens", "codes", "modality", "positions", "segment_ids", "image_block")
    _, cache = decode(params, {k: batch[k][:, :13] for k in keys}, cache)
    step = {k: batch[k][:, 13:14] for k in keys}
    assert len(set(np.asarray(step["modality"]).ravel())) == 2  # a text and an image position
    hlo = decode.lower(params, step, cache).compile().as_text()
    layer_shape = cache["layers"][0]["k"].shape
    assert layer_shape == (2, cfg.num_heads, size, cfg.d_model // cfg.num_heads)
    assert cache_copies(hlo, layer_shape) == []
    aliases = re.search(r"input_output_alias=\{(.*?)\s*\}, entry", hlo)
    assert aliases is not None
    assert len(re.findall(r"\{\d+\}: \(\d+,", aliases.group(1))) == len(jax.tree.leaves(cache))
    # The step still computes the right thing after the change of order.
    _, cache = decode(params, step, cache)
    assert int(cache["index"]) == 14
    np.testing.assert_array_equal(np.asarray(cache["segment_ids"][:, 13]),
                                  np.asarray(batch["segment_ids"][:, 13]))


def test_cache_copies_finds_a_copy():
    """The check above can fail: a step that reads the updated cache copies it."""
    shape = (1, 2, 8, 4)

    def read_after_write(cache, x):
        new = jax.lax.dynamic_update_slice(cache, x, (0, 0, 3, 0))
        return new, jnp.einsum("bhsd,bhsd->bh", new, cache)

    hlo = jax.jit(read_after_write, donate_argnums=0).lower(
        jnp.zeros(shape), jnp.ones((1, 2, 1, 4))).compile().as_text()
    assert cache_copies(hlo, shape)
