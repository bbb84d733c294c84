"""Modality-routed compute: grouped (sort + ragged_dot) == naive per-token == masked reference;
the whole MoT model == an independent per-token reference transformer (plain matmuls, which with
one modality is a plain dense transformer); text is untouched by the image modality's weights."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax import config_defaults, config_validation
from mmjax.models import layers, masks, mot
from mmjax.models.model import MultimodalLM, init_params
from test_masks import packed_batch, with_image_pos

LEVELS = (8, 5, 5, 5)
VOCAB = 50
ROWS = [[("t2i", 3, 6), ("i2t", 2, 4)], [("i2t", 1, 5), ("t2i", 0, 4)]]


def tiny_cfg(image_capacity=0, **kw):
    c = config_defaults.model_config()
    c.update(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, flow_width=32, flow_depth=1,
             max_seq_len=24)
    c.update(kw)
    return config_validation.model_block(c, VOCAB, LEVELS, image_capacity=image_capacity)


def key(seed):
    """A PRNG key whose generator compiles fast on CPU (threefry inlined ~40 times for a model
    init takes seconds to compile); tests do not need threefry's guarantees."""
    return jax.random.key(seed, impl="unsafe_rbg")


def perturb(params, seed, scale=0.1, where=lambda path: True):
    """Adds host-side noise to every leaf selected by `where`, so zero-initialised weights
    (flow-head gates and outputs) matter in comparisons too."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    out = [x + scale * rng.normal(size=x.shape).astype(np.float32)
           if where(jax.tree_util.keystr(p)) else x for p, x in leaves]
    return jax.tree_util.tree_unflatten(tree, out)


def build(cfg, batch, seed=0):
    """Model and perturbed, unboxed params (init jitted once)."""
    model = MultimodalLM(cfg)
    params = jax.jit(lambda k: nn.unbox(init_params(model, k, batch)))(key(seed))
    return model, perturb(params, seed + 1)


# ---- an independent reference: every token through its own modality's weights, one by one ----
def reference_hidden(params, batch, cfg, rope_positions=None):
    """rope_positions: the position each RoPE frequency turns by, [B, L, head_dim // 2]
    (default: the 1-D in-document position for all)."""
    mod = np.asarray(batch["modality"])
    wmod = mod if cfg.num_modalities > 1 else np.zeros_like(mod)  # whose weights process a token
    d, h = cfg.d_model, cfg.num_heads
    hd = d // h

    def per_token(kernel, x):  # kernel [M, in..., out...], x [B, L, in]: gather W per token
        m = kernel.shape[0]
        w = np.asarray(kernel).reshape(m, x.shape[-1], -1)[wmod]  # [B, L, in, out]
        return np.einsum("bli,blio->blo", x, w)

    def norm(scale, x):
        rms = np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.norm_eps)
        return x / rms * np.asarray(scale)[wmod]

    half = hd // 2
    if rope_positions is None:
        rope_positions = np.repeat(np.asarray(batch["positions"])[..., None], half, -1)

    def rope(x, pos):  # complex form of rotate-half: pairs (x_j, x_{j + half})
        freq = cfg.rope_theta ** (-np.arange(half) / half)
        z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[:, :, None, :] * freq)
        return np.concatenate([z.real, z.imag], -1)

    p = jax.tree.map(np.asarray, params)
    emb = p["embed"]["embedding"][np.where(mod == 0, batch["tokens"], 0)]
    x = np.where((mod == 0)[..., None], emb, batch["codes"] @ p["code_in"]["kernel"])
    mask = np.asarray(masks.attention_mask(batch["segment_ids"], batch["image_block"],
                                           cfg.image_bidirectional_context))
    b, n = mod.shape
    for i in range(cfg.num_layers):
        blk = p[f"blocks_{i}"]
        y = norm(blk["attn_norm"]["scale"], x)
        q, k, v = (per_token(blk[name]["kernel"], y).reshape(b, n, h, hd)
                   for name in ("query", "key", "value"))
        q, k = rope(q, rope_positions), rope(k, rope_positions)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(mask[:, None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, d)
        x = x + per_token(blk["out"]["kernel"], o)
        y = norm(blk["mlp_norm"]["scale"], x)
        g, u = per_token(blk["gate"]["kernel"], y), per_token(blk["up"]["kernel"], y)
        x = x + per_token(blk["down"]["kernel"], g / (1 + np.exp(-g)) * u)
    return norm(p["final_norm"]["scale"], x)


def test_routing_roundtrip_and_group_sizes():
    modality = jnp.array([[2, 0, 1, 0], [1, 1, 2, 0]])
    r = mot.make_routing(modality, 3)
    np.testing.assert_array_equal(r.group_sizes, [[3, 3, 2]])
    np.testing.assert_array_equal(r.modality, [0, 0, 0, 1, 1, 1, 2, 2])
    x = jnp.arange(8.0).reshape(2, 4)
    s = mot.to_sorted(x, r)
    np.testing.assert_array_equal(s, [1, 3, 7, 2, 4, 5, 0, 6])  # stable inside each group
    np.testing.assert_array_equal(mot.from_sorted(s, r, (2, 4)), x)
    one = mot.make_routing(jnp.zeros((2, 3), jnp.int32), 1)
    assert one.perm is None and int(one.group_sizes[0, 0]) == 6
    two = mot.make_routing(modality, 3, shards=2)  # sorted within each batch shard
    np.testing.assert_array_equal(two.group_sizes, [[2, 1, 1], [1, 2, 1]])
    s2 = mot.to_sorted(x, two)
    np.testing.assert_array_equal(s2, [1, 3, 2, 0, 7, 4, 5, 6])
    np.testing.assert_array_equal(mot.from_sorted(s2, two, (2, 4)), x)


def test_modality_dense_grouped_equals_naive_and_masked():
    """Each impl with its own sorted layout ('tiled': groups padded to tiles of 4 rows), checked
    in the original token order against a per-token loop: values and gradients."""
    rng = np.random.default_rng(0)
    modality = jnp.asarray(rng.choice([0, 2], size=(3, 7)))  # modality 1 absent: an empty group
    x = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)
    outs, grads = {}, {}
    for impl in ("ragged", "masked", "tiled"):
        routing = mot.make_routing(modality, 3, tile=4 if impl == "tiled" else None)
        layer = mot.ModalityDense(3, (6,), (2, 5), ("embed",), ("heads", "kv"), impl=impl, tile=4)
        params = layer.init(jax.random.key(1), mot.to_sorted(x, routing), routing)

        def forward(p, x, layer=layer, routing=routing):
            y = layer.apply(p, mot.to_sorted(x, routing), routing)
            return mot.from_sorted(y, routing, (3, 7, 10))

        outs[impl] = forward(params, x)
        grads[impl] = jax.grad(lambda p, x, f=forward: jnp.sum(jnp.sin(f(p, x))),
                               argnums=(0, 1))(params, x)
    assert outs["tiled"].shape == (3, 7, 10)
    kernel = np.asarray(nn.unbox(params)["params"]["kernel"]).reshape(3, 6, 10)
    naive = np.stack([[np.asarray(x[b, t]) @ kernel[int(modality[b, t])] for t in range(7)]
                      for b in range(3)])
    for impl in ("ragged", "masked", "tiled"):
        np.testing.assert_allclose(outs[impl], naive, rtol=1e-5, atol=1e-5)
    for other in ("masked", "tiled"):
        for a, b in zip(jax.tree.leaves(grads["ragged"]), jax.tree.leaves(grads[other])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert nn.get_partition_spec(params)["params"]["kernel"] == jax.sharding.PartitionSpec(
        "modality", "embed", "heads", "kv")


def test_padded_routing_layout():
    """'tiled' routing: each group starts on a tile boundary, pad rows are zero, round trip."""
    modality = jnp.array([[2, 0, 1, 0], [1, 1, 2, 0]])
    r = mot.make_routing(modality, 3, tile=2)  # 8 tokens -> ceil(8/2) + 3 - 1 = 6 tiles
    np.testing.assert_array_equal(r.tile_group, [[0, 0, 1, 1, 2, 2]])
    np.testing.assert_array_equal(r.modality, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    x = jnp.arange(1.0, 9.0).reshape(2, 4)
    s = mot.to_sorted(x, r)
    np.testing.assert_array_equal(s, [2, 4, 8, 0, 3, 5, 6, 0, 1, 7, 0, 0])
    np.testing.assert_array_equal(mot.from_sorted(s, r, (2, 4)), x)
    two = mot.make_routing(modality, 3, shards=2, tile=2)  # per shard: 2 + 2 tiles
    assert two.perm.shape == (2, 8) and two.tile_group.shape == (2, 4)
    np.testing.assert_array_equal(mot.from_sorted(mot.to_sorted(x, two), two, (2, 4)), x)
    np.testing.assert_array_equal(mot.sorted_layout(mot.to_sorted(x[..., None], two), two, 2, 4)
                                  .shape, (2, 8, 1))


def test_model_equals_per_token_reference_for_one_and_two_modalities():
    batch = packed_batch(ROWS, 24, VOCAB, LEVELS)
    for m in (1, 2):
        cfg = tiny_cfg(num_modalities=m)
        b = batch
        model, params = build(cfg, b)
        got = jax.jit(model.apply)({"params": params}, b)
        np.testing.assert_allclose(got, reference_hidden(params, b, cfg), rtol=1e-4, atol=1e-4)
        if m == 2:  # the masked reference implementation agrees with ragged too
            masked = MultimodalLM(tiny_cfg(num_modalities=2, mot_impl="masked"))
            np.testing.assert_allclose(jax.jit(masked.apply)({"params": params}, b), got,
                                       atol=1e-5)


def rope_2d_reference_positions(batch, side, half):
    """Per-frequency RoPE positions of model.image_positions="rope_2d", found by walking each
    row: an image token k of the run of image tokens starting at in-document position s turns
    frequency j by (p, s + k // side, s + k % side)[j % 3]; a text token by p."""
    pos, mod = np.asarray(batch["positions"]), np.asarray(batch["modality"])
    out = np.repeat(pos[..., None], half, -1).astype(np.float64)
    for r in range(pos.shape[0]):
        for i in range(pos.shape[1]):
            if mod[r, i] != 1:
                continue
            k = 0
            while i - k - 1 >= 0 and mod[r, i - k - 1] == 1:
                k += 1
            axes = (pos[r, i], pos[r, i - k] + k // side, pos[r, i - k] + k % side)
            out[r, i] = [axes[j % 3] for j in range(half)]
    return out


def test_rope_2d_equals_per_token_reference():
    """2-D RoPE against the reference fed positions found independently (runs of image tokens,
    not image_pos), on two packed rows with two images each; and it differs from 1-D RoPE."""
    batch = with_image_pos(packed_batch(ROWS, 24, VOCAB, LEVELS))
    cfg = dataclasses.replace(tiny_cfg(num_modalities=2), image_positions="rope_2d", image_side=3)
    model, params = build(cfg, batch)
    got = np.asarray(jax.jit(model.apply)({"params": params}, batch))
    half = cfg.head_dim // 2
    expected = reference_hidden(params, batch, cfg, rope_2d_reference_positions(batch, 3, half))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, reference_hidden(params, batch, cfg), atol=1e-3)  # != 1-D


def test_rope_with_equal_axes_is_1d_rope_and_scores_depend_on_offsets_per_axis():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 5, 2, 12)), jnp.float32) for _ in range(2))
    pos = jnp.asarray(rng.integers(0, 50, (1, 5)), jnp.int32)
    np.testing.assert_allclose(layers.rope(q, jnp.stack([pos] * 3, -1), 1e4),
                               layers.rope(q, pos, 1e4), rtol=1e-5, atol=1e-5)

    def scores(p):
        return np.einsum("bthd,bshd->bhts", layers.rope(q, p, 1e4), layers.rope(k, p, 1e4))
    axes = jnp.asarray(rng.integers(0, 50, (1, 5, 3)), jnp.int32)
    shifted = axes + jnp.asarray([7, -3, 11], jnp.int32)  # one shift per axis for every token
    np.testing.assert_allclose(scores(shifted), scores(axes), rtol=1e-4, atol=1e-4)
    for a in range(3):  # each axis is read: moving one token on one axis changes its scores
        moved = axes.at[0, 2, a].add(1)
        assert not np.allclose(scores(moved), scores(axes), atol=1e-3)


def test_text_ignores_image_weights():
    cfg = tiny_cfg(num_modalities=2)
    mixed = packed_batch(ROWS, 24, VOCAB, LEVELS)
    text_only = dict(mixed, modality=np.zeros_like(mixed["modality"]))
    model, params = build(cfg, mixed)
    image_only = lambda path: "blocks_" in path or "final_norm" in path  # noqa: E731
    # Perturb only the image modality's slice (index 1 of the stacked `modality` axis).
    noise = perturb(jax.tree.map(np.zeros_like, params), 7, 1.0, image_only)
    mask = np.zeros((2, 1), np.float32)
    mask[1] = 1.0
    bumped = jax.tree.map(lambda p, n: p + n * mask.reshape((2,) + (1,) * (p.ndim - 1))
                          if p.ndim >= 2 and p.shape[0] == 2 else p, params, noise)
    f = jax.jit(lambda p, b: model.apply({"params": p}, b))
    np.testing.assert_array_equal(f(params, text_only), f(bumped, text_only))
    assert not np.allclose(f(params, mixed), f(bumped, mixed), atol=1e-3)


def test_auto_impl_picks_ragged_below_one_tile_on_cpu():
    """A decode step (B x 1 rows) would pad every group to a whole tile under 'tiled'."""
    assert jax.default_backend() == "cpu"
    assert mot.resolve_impl("auto", rows=4096, tile=128) == "tiled"
    assert mot.resolve_impl("auto", rows=1, tile=128) == "ragged"
    assert mot.resolve_impl("auto") == "tiled"
    assert mot.resolve_impl("masked", rows=1) == "masked"
    assert mot.routing_shards(8, "ragged") == 1


# ---- static per-row buckets (mot_impl='buckets') ---------------------------------------------
def test_bucket_routing_layout_and_overflow():
    """Each shard sorted to [text | padding | image]; its last B_s x C rows take the image
    weights."""
    modality = jnp.array([[1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]])
    real = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1]], bool)
    r = mot.make_bucket_routing(modality, real, image_capacity=3)
    x = jnp.arange(1.0, 13.0).reshape(2, 6)
    s = mot.to_sorted(x, r)
    np.testing.assert_array_equal(s, [2, 4, 7, 12, 5, 6, 11, 1, 3, 8, 9, 10])
    np.testing.assert_array_equal(r.modality, [0] * 6 + [1] * 6)
    np.testing.assert_array_equal(mot.from_sorted(s, r, (2, 6)), x)
    np.testing.assert_array_equal(r.overflow, [False, False])
    two = mot.make_bucket_routing(modality, real, image_capacity=3, shards=2)  # one row each
    np.testing.assert_array_equal(mot.to_sorted(x, two), [2, 4, 5, 6, 1, 3, 7, 12, 11, 8, 9, 10])
    np.testing.assert_array_equal(mot.sorted_layout(mot.to_sorted(x[..., None], two), two, 2, 6)
                                  .shape, (2, 6, 1))
    over = mot.make_bucket_routing(modality, real, image_capacity=2)  # 5 images > 2 x 2
    np.testing.assert_array_equal(over.overflow, [True, True])
    over_two = mot.make_bucket_routing(modality, real, image_capacity=2, shards=2)
    np.testing.assert_array_equal(over_two.overflow, [False, True])  # row 1 has 3 images
    all_real = mot.make_bucket_routing(modality, jnp.ones_like(real), image_capacity=1, shards=2)
    np.testing.assert_array_equal(all_real.overflow, [True, True])  # too much text in each


def test_buckets_equal_naive_at_real_tokens_values_and_gradients():
    rng = np.random.default_rng(3)
    cap, rows = 4, []  # rows of 9: <= 4 image, <= 5 text tokens, the rest padding, shuffled
    for n_image, n_text in ((4, 5), (0, 3), (2, 5), (4, 0)):
        kinds = np.array([2] * n_image + [0] * n_text + [1] * (9 - n_image - n_text))
        rows.append(rng.permutation(kinds))
    kinds = np.stack(rows)  # 0 text, 1 padding, 2 image
    modality, real = jnp.asarray(kinds == 2, jnp.int32), jnp.asarray(kinds != 1)
    x = jnp.asarray(rng.normal(size=(4, 9, 6)), jnp.float32)
    layer = mot.ModalityDense(2, (6,), (5,), ("embed",), ("mlp",), impl="buckets")
    routing = mot.make_bucket_routing(modality, real, cap)
    assert not bool(routing.overflow.any())
    params = layer.init(jax.random.key(1), mot.to_sorted(x, routing), routing)
    w = jnp.asarray(real, jnp.float32)[..., None]

    def loss(p, x):  # only real tokens count, as in training (padding carries no target)
        y = mot.from_sorted(layer.apply(p, mot.to_sorted(x, routing), routing), routing, (4, 9, 5))
        return jnp.sum(jnp.sin(y) * w), y

    (_, got), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    kernel = nn.unbox(params)["params"]["kernel"]
    naive = jnp.einsum("btk,btkf->btf", x, kernel[modality])
    np.testing.assert_allclose(np.asarray(got) * w, np.asarray(naive) * w, rtol=1e-5, atol=1e-5)
    want = jax.grad(lambda k, x: jnp.sum(jnp.sin(jnp.einsum("btk,btkf->btf", x, k[modality])) * w),
                    argnums=(0, 1))(kernel, x)
    np.testing.assert_allclose(nn.unbox(grads[0])["params"]["kernel"], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], want[1], rtol=1e-5, atol=1e-5)


def test_model_with_buckets_equals_tiled_at_real_positions_and_refuses_overflow():
    batch = packed_batch(ROWS, 24, VOCAB, LEVELS)
    real = batch["segment_ids"] > 0
    cap = int(np.max(np.sum(real & (batch["modality"] == 1), -1)))
    tiled_cfg = tiny_cfg(num_modalities=2, mot_impl="tiled", mot_tile=4)
    model, params = build(tiled_cfg, batch)
    bucketed = MultimodalLM(tiny_cfg(cap, num_modalities=2, mot_impl="auto", mot_tile=4))
    w = jnp.asarray(real, jnp.float32)[..., None]

    def loss(m):
        return lambda p: jnp.sum(jnp.tanh(m.apply({"params": p}, batch)) * w)

    got, want = (jax.jit(m.apply)({"params": params}, batch) for m in (bucketed, model))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-4, atol=1e-4)
    g_got, g_want = (jax.jit(jax.grad(loss(m)))(params) for m in (bucketed, model))
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    total_images = int(np.sum(real & (batch["modality"] == 1)))
    small_cap = total_images // len(ROWS) - 1  # the shard's images do not fit its buckets
    small = MultimodalLM(tiny_cfg(small_cap, num_modalities=2, mot_impl="buckets"))
    with pytest.raises(ValueError, match=f"image_capacity={small_cap}"):
        small.apply({"params": params}, batch)
    assert np.isnan(np.asarray(jax.jit(small.apply)({"params": params}, batch))).all()


def test_buckets_are_chosen_only_where_they_fit():
    assert mot.resolve_impl("auto", rows=4096, tile=128, buckets_fit=True) == "buckets"
    assert mot.resolve_impl("buckets", rows=4096, tile=128) == "tiled"  # e.g. a prefill chunk
    assert mot.resolve_impl("buckets", rows=1, tile=128) == "ragged"  # a decode step
    assert mot.resolve_impl("tiled", rows=4096, buckets_fit=True) == "tiled"


def test_auto_on_accelerators_takes_buckets_where_they_fit_and_ragged_elsewhere():
    assert mot.resolve_impl("auto", 4096, 128, buckets_fit=True, backend="gpu") == "buckets"
    assert mot.resolve_impl("auto", 4096, 128, buckets_fit=False, backend="gpu") == "ragged"
    assert mot.resolve_impl("auto", 1, 128, buckets_fit=False, backend="gpu") == "ragged"
    assert mot.resolve_impl("buckets", 1, 128, backend="gpu") == "ragged"  # a decode step
    assert mot.resolve_impl("auto", 4096, 128, buckets_fit=True, backend="tpu") == "ragged"
