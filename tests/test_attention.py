"""Attention implementations (mmjax/models/attention*.py) against the dense reference einsum:
values and gradients (chunked, Pallas and splash in interpret mode, the cuDNN call through XLA)
on random packed batches (several segments, context image blocks, padding),
decode over a partly filled cache, the splash mask decomposition, the whole model with each
implementation, and the config check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_validation
from mmjax.config_defaults import base_config
from mmjax.models import attention, attention_pallas, attention_splash, masks
from test_masks import packed_batch
from test_mot import build, tiny_cfg

B, T, H, DH = 2, 40, 2, 8


def random_layout(rng, batch, length):
    """segment_ids / image_block [B, L]: 2-4 documents per row, each with a context image block
    (a contiguous run, ids unique within the row) half of the time, then trailing padding."""
    seg = np.zeros((batch, length), np.int32)
    blk = np.zeros((batch, length), np.int32)
    for r in range(batch):
        pos, doc, block = 0, 1, 1
        used = length - int(rng.integers(0, 6))  # padding at the end
        while pos < used:
            n = min(int(rng.integers(4, 16)), used - pos)
            seg[r, pos:pos + n] = doc
            if n >= 4 and rng.random() < 0.6:
                a = pos + int(rng.integers(0, n - 2))
                e = min(pos + n, a + int(rng.integers(2, 7)))
                blk[r, a:e] = block
                block += 1
            pos, doc = pos + n, doc + 1
    return seg, blk


def qkv(rng, batch=B, t=T, s=None):
    s = t if s is None else s
    f = lambda n: jnp.asarray(rng.normal(size=(batch, n, H, DH)), jnp.float32)  # noqa: E731
    return f(t), f(s), f(s)


def run_impl(name, spec, block):
    if name == "reference":
        return lambda q, k, v: attention.attend(q, k, v, spec, "reference")
    if name == "chunked":
        return lambda q, k, v: attention.chunked_attend(q, k, v, spec, block, block)
    if name == "pallas":
        return lambda q, k, v: attention_pallas.pallas_attend(q, k, v, spec, block, block, True)
    if name == "cudnn":  # the same jax.nn.dot_product_attention call, through XLA on CPU
        return lambda q, k, v: attention.cudnn_attend(q, k, v, spec, implementation=None)
    raise AssertionError(name)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    seg, blk = random_layout(rng, B, T)
    assert len(np.unique(seg)) >= 4 and blk.max() >= 2 and (seg == 0).any()
    q, k, v = qkv(rng)
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    spec = attention.train_spec(jnp.asarray(seg), jnp.asarray(blk), True)
    ref = run_impl("reference", spec, 0)
    grads = jax.grad(lambda *a: jnp.sum(ref(*a) * do), argnums=(0, 1, 2))(q, k, v)
    return dict(spec=spec, q=q, k=k, v=v, do=do, out=ref(q, k, v), grads=grads, seg=seg, blk=blk)


def test_reference_is_layers_attend(case):
    """`reference` keeps the numerics of the einsum the backbone used before."""
    from mmjax.models import layers
    mask = masks.attention_mask(jnp.asarray(case["seg"]), jnp.asarray(case["blk"]), True)
    np.testing.assert_array_equal(np.asarray(layers.attend(case["q"], case["k"], case["v"], mask)),
                                  np.asarray(case["out"]))


# Block sizes that divide T, that do not (padding), and one block for everything.
@pytest.mark.parametrize("name,block", [("chunked", 8), ("chunked", 16), ("chunked", 64),
                                        ("pallas", 16), ("cudnn", 0)])
def test_equals_reference_values_and_gradients(case, name, block):
    f = run_impl(name, case["spec"], block)
    q, k, v, do = case["q"], case["k"], case["v"], case["do"]
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(case["out"]), atol=2e-6)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, case["grads"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_unidirectional_spec_ignores_image_blocks(case):
    """bidirectional=False folds to zero block ids: same as the dense causal+segment mask."""
    seg, blk = jnp.asarray(case["seg"]), jnp.asarray(case["blk"])
    spec = attention.train_spec(seg, blk, False)
    np.testing.assert_array_equal(np.asarray(attention.dense_mask(spec)),
                                  np.asarray(masks.attention_mask(seg, blk, False)))
    got = attention.chunked_attend(case["q"], case["k"], case["v"], spec, 16, 16)
    want = attention.reference_attend(case["q"], case["k"], case["v"],
                                      masks.attention_mask(seg, blk, False))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("filled,t", [(5, 1), (23, 1), (37, 1), (16, 8)])
def test_decode_over_filled_blocks_equals_reference(filled, t):
    """A chunk of t queries at slots filled-t.. of a 40-slot cache whose later slots hold junk
    (non-zero k/v, segment 0): the chunked loop over filled blocks == the dense decode mask."""
    rng = np.random.default_rng(filled)
    size = 40
    seg, blk = random_layout(rng, B, size)
    seg[:, filled:] = 0
    blk[:, filled:] = 0
    start = filled - t
    q, k, v = qkv(rng, t=t, s=size)
    spec = attention.decode_spec(jnp.asarray(seg[:, start:filled]),
                                 jnp.asarray(blk[:, start:filled]), start, jnp.asarray(seg),
                                 jnp.asarray(blk), True)
    dense = masks.decode_attention_mask(jnp.asarray(seg[:, start:filled]),
                                        jnp.asarray(blk[:, start:filled]), start,
                                        jnp.asarray(seg), jnp.asarray(blk), True)
    np.testing.assert_array_equal(np.asarray(attention.dense_mask(spec)), np.asarray(dense))
    want = attention.reference_attend(q, k, v, dense)
    got = jax.jit(lambda *a: attention.attend(*a, spec, "chunked", block_size=8))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_splash_sets_partition_the_mask(case):
    """The two splash calls' masks are disjoint and together exactly `masks.allowed`; has_B says
    which rows B is non-empty for (so splash's fully masked rows never count)."""
    a, b = attention_splash.set_masks(case["spec"])
    allowed = np.asarray(attention.dense_mask(case["spec"]))
    a, b = np.asarray(a), np.asarray(b)
    assert not (a & b).any()
    np.testing.assert_array_equal(a | b, allowed)
    _, _, has_b = attention_splash.split_sets(case["spec"])
    np.testing.assert_array_equal(np.asarray(has_b), b.any(-1))
    assert np.asarray(has_b).any() and a.any(-1).all()


def test_splash_interpret_equals_reference_values_and_gradients():
    """The two splash calls merged by lse (Pallas interpret mode; splash tiles are 128)."""
    rng = np.random.default_rng(5)
    seg, blk = random_layout(rng, 1, 128)
    q, k, v = qkv(rng, batch=1, t=128)
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    spec = attention.train_spec(jnp.asarray(seg), jnp.asarray(blk), True)
    ref = run_impl("reference", spec, 0)
    got = lambda *a: attention_splash.splash_attend(*a, spec, True)  # noqa: E731
    np.testing.assert_allclose(np.asarray(got(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-6)
    for name_grads in zip(*(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * do), argnums=(0, 1, 2))(
            q, k, v) for f in (got, ref))):
        np.testing.assert_allclose(np.asarray(name_grads[0]), np.asarray(name_grads[1]),
                                   atol=2e-5)


@pytest.fixture(scope="module")
def model_case():
    batch = packed_batch([[("t2i", 3, 6), ("i2t", 2, 4)], [("i2t", 1, 5), ("t2i", 0, 4)]], 24,
                         seed=3)
    return batch


@pytest.mark.parametrize("impl", ["chunked", "pallas", "cudnn"])
def test_model_forward_with_impl_equals_reference(model_case, impl):
    """The whole backbone with attention_impl=X (tile 8: several blocks of the 24 positions)."""
    if impl == "cudnn" and jax.default_backend() == "cpu":
        pytest.skip("cuDNN needs a GPU; the XLA-run call is covered by the unit test above")
    outs = {}
    for name in ("reference", impl):
        cfg = tiny_cfg(num_modalities=2, attention_impl=name, attention_block=8)
        model, params = build(cfg, model_case)
        outs[name] = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, b))(params,
                                                                                 model_case))
    assert np.isfinite(outs["reference"]).all()
    np.testing.assert_allclose(outs[impl], outs["reference"], atol=2e-5)


def test_config_rejects_unknown_attention_impl():
    c = base_config()
    c.model.attention_impl = "flash"
    with pytest.raises(config_validation.ConfigError, match="model.attention_impl"):
        config_validation.validate(c)


def test_auto_picks_cudnn_for_16_bit_inputs_on_gpu_and_pallas_otherwise():
    resolve = attention.resolve_impl
    assert resolve("auto", 1024, 1024, jnp.bfloat16, 128, backend="gpu") == "cudnn"
    assert resolve("auto", 1024, 1024, jnp.float16, 64, backend="gpu") == "cudnn"
    assert resolve("auto", 1024, 1024, jnp.float32, 128, backend="gpu") == "pallas"
    assert resolve("auto", 1024, 1024, jnp.bfloat16, 256, backend="gpu") == "pallas"
    assert resolve("auto", 1024, 1024, jnp.bfloat16, 128, backend="tpu") == "splash"
    assert resolve("auto", 96, 96, jnp.float32, 32, backend="cpu") == "reference"
    assert resolve("auto", 4096, 4096, jnp.float32, 32, backend="cpu") == "chunked"
    assert resolve("pallas", 96, 96, jnp.bfloat16, 128, backend="gpu") == "pallas"

