"""MultimodalLM: KV-cache decoding == full forward (LM logits and flow velocities; prefill with a
bidirectional context image, then one position at a time), packed documents are independent,
every parameter is logically partitioned, remat does not change gradients, the config variants
(tied LM head, discrete/factorised head, bf16) behave, CAM noise only touches image inputs, and
bad input fails loudly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax.models.model import MultimodalLM, init_cache, init_params
from test_masks import packed_batch, with_image_pos
from test_mot import LEVELS, VOCAB, build, key, tiny_cfg

L = 24
# Row 0: two text->image documents (decodable position by position). Row 1: image->caption
# (context image at positions 2..6, <eoi> at 7) then a text->image document, then padding.
ROWS = [[("t2i", 3, 6), ("t2i", 1, 4)], [("i2t", 2, 5), ("t2i", 0, 3)]]
PREFILL = 8
INPUT_KEYS = ("tokens", "codes", "modality", "positions", "segment_ids", "image_block")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg(num_modalities=2, max_seq_len=L)
    batch = packed_batch(ROWS, L, VOCAB, LEVELS, seed=1)
    model, params = build(cfg, batch)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
    rng = np.random.default_rng(0)
    x_t = rng.normal(size=(2, L, len(LEVELS))).astype(np.float32)
    t = rng.uniform(size=(2, L)).astype(np.float32)

    @jax.jit
    def heads(p, hidden):
        lm = model.apply({"params": p}, hidden, method=MultimodalLM.lm_logits)
        vel = model.apply({"params": p}, hidden, x_t, t, method=MultimodalLM.flow_velocity)
        return lm, vel

    return dict(cfg=cfg, batch=batch, model=model, params=params, forward=forward, heads=heads)


def _decode_all(s, chunks, keys=INPUT_KEYS):
    """Decodes `chunks` [(start, end), ...] in order; returns the hidden states [B, L, D]."""
    decode = jax.jit(lambda p, c, cache: s["model"].apply(
        {"params": p}, c, cache, method=MultimodalLM.decode))
    cache = init_cache(s["cfg"], 2)
    out = []
    for start, end in chunks:
        chunk = {k: s["batch"][k][:, start:end] for k in keys}
        hidden, cache = decode(s["params"], chunk, cache)
        out.append(hidden)
    assert int(cache["index"]) == L
    return jnp.concatenate(out, axis=1)


def test_cached_decoding_matches_full_forward(setup):
    s = setup
    full_lm, full_vel = s["heads"](s["params"], s["forward"](s["params"], s["batch"]))
    assert np.abs(full_vel).mean() > 1e-2  # the flow head is not trivially zero here
    # Prefill (covers row 1's context image) then single steps: every position matches.
    hidden = _decode_all(s, [(0, PREFILL)] + [(i, i + 1) for i in range(PREFILL, L)])
    lm, vel = s["heads"](s["params"], hidden)
    np.testing.assert_allclose(lm, full_lm, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(vel, full_vel, atol=1e-5, rtol=1e-5)
    # One position at a time from the start: exact wherever no context image is involved...
    hidden = _decode_all(s, [(i, i + 1) for i in range(L)])
    lm, vel = s["heads"](s["params"], hidden)
    same = np.ones((2, L), bool)
    same[1, 2:11] = False  # row 1's context image and its caption
    np.testing.assert_allclose(lm[same], full_lm[same], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(vel[same], full_vel[same], atol=1e-5, rtol=1e-5)
    # ...while a context image cut into single steps cannot see its later tokens.
    assert not np.allclose(lm[1, 2:11], full_lm[1, 2:11], atol=1e-3)


def test_packed_documents_are_independent(setup):
    s = setup
    batch = s["batch"]
    packed = s["forward"](s["params"], batch)
    # Row 0's second document (positions 13..21) moved alone to the start of a row.
    alone = {k: np.zeros_like(v) for k, v in batch.items()}
    for k, v in batch.items():
        alone[k][:, :9] = v[:1, 13:22]
    alone["segment_ids"][:, :9] = 1
    got = s["forward"](s["params"], alone)
    np.testing.assert_allclose(got[0, :9], packed[0, 13:22], atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(packed)).all()  # padding rows attend to themselves only


def test_every_param_is_logically_partitioned(setup):
    s = setup
    boxed = jax.eval_shape(lambda k: init_params(s["model"], k, s["batch"]), key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 20
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape), leaf
        assert leaf.value.dtype == jnp.float32


def test_remat_dots_gives_the_same_gradients(setup):
    s = setup
    model_remat = MultimodalLM(tiny_cfg(num_modalities=2, max_seq_len=L, remat="dots"))
    grads = []
    for model in (s["model"], model_remat):
        loss = lambda p, m=model: jnp.sum(jnp.sin(m.apply({"params": p}, s["batch"])))  # noqa: E731
        grads.append(jax.jit(jax.grad(loss))(s["params"]))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_variants_tied_discrete_factorized_bf16():
    cfg = tiny_cfg(num_modalities=2, max_seq_len=L, tie_embeddings=True, image_head="discrete",
                   discrete_factorized=True, dtype="bfloat16")
    batch = packed_batch(ROWS, L, VOCAB, LEVELS)
    model, params = build(cfg, batch)
    assert "lm_head" not in params and "flow_head" not in params
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

    @jax.jit
    def run(p):
        hidden = model.apply({"params": p}, batch)
        return (hidden, model.apply({"params": p}, hidden, method=MultimodalLM.lm_logits),
                model.apply({"params": p}, hidden, method=MultimodalLM.index_logits))

    hidden, lm, index = run(params)
    assert hidden.dtype == jnp.bfloat16 and lm.dtype == jnp.float32
    tied = np.asarray(hidden, np.float32) @ np.asarray(params["embed"]["embedding"]).T
    np.testing.assert_allclose(lm, tied, rtol=0.05, atol=0.05 * np.abs(tied).max())
    assert [x.shape for x in index] == [(2, L, n) for n in LEVELS]
    with pytest.raises(ValueError, match="image_head='flow'"):
        model.apply({"params": params}, hidden, hidden[..., :4], hidden[..., 0],
                    method=MultimodalLM.flow_velocity)


def test_noise_augmentation_only_touches_image_inputs(setup):
    s = setup
    noisy = MultimodalLM(tiny_cfg(num_modalities=2, max_seq_len=L, noise_aug=0.5))
    fwd = jax.jit(lambda p, b, k, train: noisy.apply({"params": p}, b, train=train,
                                                      rngs={"noise": k}), static_argnums=3)
    clean = s["forward"](s["params"], s["batch"])
    np.testing.assert_array_equal(fwd(s["params"], s["batch"], key(1), False), clean)
    train = np.asarray(fwd(s["params"], s["batch"], key(1), True))
    changed = np.abs(train - np.asarray(clean)).max(-1) > 1e-6
    # Row 0, document 1: <bos> + 3 caption + <boi> come before the first image token.
    assert not changed[0, :5].any() and changed[0, 5:13].all()


def test_bad_input_fails_loudly(setup):
    s = setup
    bad = dict(s["batch"], modality=np.where(s["batch"]["modality"] == 1, 2, 0).astype(np.int32))
    with pytest.raises(ValueError, match="modality"):
        s["model"].apply({"params": s["params"]}, bad)
    traced = np.asarray(jax.jit(lambda p, b: s["model"].apply({"params": p}, b))(s["params"], bad))
    assert np.isnan(traced[bad["modality"] == 2]).all()
    assert np.isfinite(traced[bad["modality"] == 0]).all()
    chunk = {k: s["batch"][k] for k in INPUT_KEYS}
    with pytest.raises(ValueError, match="overflows the cache"):
        s["model"].apply({"params": s["params"]}, chunk, init_cache(s["cfg"], 2, max_len=L - 1),
                         method=MultimodalLM.decode)
    with pytest.raises(ValueError, match="codes"):
        s["model"].apply({"params": s["params"]},
                         dict(s["batch"], codes=s["batch"]["codes"][..., :3]))


def test_sharded_over_data_fsdp_tensor_matches_unsharded():
    """Every logical name maps through parallel.py's rules, and a (data, fsdp, tensor) = (2, 2, 2)
    mesh gives the same hidden states and loss as one device. (Forward only: compiling the
    gradient twice would dominate this file's run time.)"""
    from mmjax import config_defaults, config_validation, objectives, parallel

    cfg = tiny_cfg(num_modalities=2, max_seq_len=L, flow_t_samples=1)
    obj = config_validation.objective_config(config_defaults.objective_config())
    batch = packed_batch(ROWS * 2, L, VOCAB, LEVELS, seed=4)
    model, params = build(cfg, batch)
    boxed = jax.eval_shape(lambda k: init_params(model, k, batch), key(0))

    def run(p, b):
        hidden = model.apply({"params": p}, b)
        return hidden, objectives.compute_losses(model, p, b, key(5), obj, train=True)[0]

    want = jax.jit(run)(params, batch)
    mesh_cfg = config_defaults.mesh_config()
    mesh_cfg.update(data=2, fsdp=2, tensor=2)
    mesh = parallel.create_mesh(mesh_cfg, jax.devices()[:8])
    rules = parallel.logical_rules()
    param_sh = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    assert param_sh["blocks_0"]["query"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None)
    batch_sh = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(run, in_shardings=(param_sh, batch_sh))(params, batch)
    assert got[0].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


# (model.image_positions, model.image_input)
INPUT_SCHEMES = [("learned_2d", "code"), ("sincos_2d", "code"), ("rope_2d", "code"),
                 ("none", "code+index"), ("sincos_2d", "code+index")]


@pytest.fixture(scope="module", params=INPUT_SCHEMES, ids=["+".join(p) for p in INPUT_SCHEMES])
def grid(setup, request):
    """The setup's batch under each image-input scheme: 2-D positions (3-wide grid), the index
    embedding, both."""
    positions, image_input = request.param
    cfg = dataclasses.replace(setup["cfg"], image_positions=positions, image_input=image_input,
                              image_side=3)
    batch = with_image_pos(setup["batch"])
    model, params = build(cfg, batch)
    return dict(setup, cfg=cfg, batch=batch, model=model, params=params,
                forward=jax.jit(lambda p, b: model.apply({"params": p}, b)))


def test_image_input_schemes_cached_decoding_matches_full_forward(grid):
    s = grid
    learned = s["cfg"].image_positions == "learned_2d"
    assert ({"image_row", "image_col"} <= set(s["params"])) == learned
    assert ("image_embed" in s["params"]) == (s["cfg"].image_input == "code+index")
    full = np.asarray(s["forward"](s["params"], s["batch"]))
    hidden = _decode_all(s, [(0, PREFILL)] + [(i, i + 1) for i in range(PREFILL, L)],
                         INPUT_KEYS + ("image_pos",))
    np.testing.assert_allclose(hidden, full, atol=1e-5, rtol=1e-5)
    image = s["batch"]["modality"] == 1
    if s["cfg"].image_positions != "none":
        with pytest.raises(ValueError, match="image_pos"):  # the scheme needs the key
            _decode_all(s, [(0, L)])
        # The grid embedding is used: shifting every image token's index changes the output.
        pos = s["batch"]["image_pos"]
        moved = dict(s["batch"], image_pos=np.where(pos >= 0, (pos + 1) % 9, -1).astype(np.int32))
        assert not np.allclose(np.asarray(s["forward"](s["params"], moved)), full, atol=1e-4)
    if s["cfg"].image_input == "code+index":  # the index is read: same codes, other indices
        other = np.where(image, (s["batch"]["tokens"] + 1) % s["cfg"].codebook_size,
                         s["batch"]["tokens"]).astype(np.int32)
        changed = np.asarray(s["forward"](s["params"], dict(s["batch"], tokens=other)))
        assert not np.allclose(changed, full, atol=1e-4)


def test_image_input_schemes_packed_documents_are_independent(grid):
    s = grid
    batch = s["batch"]
    packed = s["forward"](s["params"], batch)
    alone = {k: np.zeros_like(v) for k, v in batch.items()}
    alone["image_pos"][:] = -1
    for k, v in batch.items():
        alone[k][:, :9] = v[:1, 13:22]  # row 0's second document, moved to the row's start
    alone["segment_ids"][:, :9] = 1
    got = s["forward"](s["params"], alone)
    np.testing.assert_allclose(got[0, :9], packed[0, 13:22], atol=1e-5, rtol=1e-5)


def test_cam_noise_on_generated_images_only_one_std_per_document():
    """Eight text->image documents of 64 image tokens, then a context image (image->text) and
    padding in one row: noise only on the generated images, with a std per document."""
    docs, n, d = 8, 64, len(LEVELS)
    seg = np.concatenate([np.repeat(np.arange(1, docs + 1), n), np.full(n, docs + 1),
                          np.zeros(16, np.int64)]).astype(np.int32)[None]
    batch = {"segment_ids": seg, "modality": np.ones_like(seg),
             "image_block": np.where(seg == docs + 1, docs + 1, 0).astype(np.int32),
             "codes": np.zeros(seg.shape + (d,), np.float32)}
    batch["modality"][0, ::n] = 0  # one text token at the start of each document
    model = MultimodalLM(tiny_cfg(num_modalities=2, max_seq_len=L, noise_aug=1.0))
    noise = np.asarray(model.apply({}, batch, rngs={"noise": key(3)},
                                   method=lambda m, b: m._cam_noise(b, b["codes"].shape)))[0]
    generated = (batch["modality"][0] == 1) & (seg[0] >= 1) & (seg[0] <= docs)
    assert not noise[~generated].any() and (noise[generated] != 0).all()
    stds = np.array([noise[(seg[0] == k) & generated].std() for k in range(1, docs + 1)])
    # One std for the whole row would give 8 estimates within a few % of each other.
    assert stds.max() / stds.min() > 1.5
    halves = [noise[(seg[0] == k) & generated] for k in range(1, docs + 1)]
    for h in halves:  # ... and within a document both halves share one std
        a, b = h[:len(h) // 2].std(), h[len(h) // 2:].std()
        assert 0.7 < a / b < 1.4


def test_no_image_positions_ignores_image_pos(setup):
    """model.image_positions="none" (the default) is the model before image_pos existed."""
    s = setup
    batch = with_image_pos(s["batch"])
    pos = batch["image_pos"]
    moved = dict(batch, image_pos=np.where(pos >= 0, (pos + 1) % 9, -1).astype(np.int32))
    np.testing.assert_array_equal(s["forward"](s["params"], batch),
                                  s["forward"](s["params"], moved))
    assert "image_row" not in s["params"]


def test_sincos_2d_features_have_unit_norm_and_tell_rows_from_columns():
    from mmjax.models import layers
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    emb = np.asarray(layers.sincos_2d(jnp.asarray(rows), jnp.asarray(cols), 32)).reshape(64, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    assert len({tuple(np.round(e, 5)) for e in emb}) == 64  # every cell its own vector
    swapped = np.asarray(layers.sincos_2d(jnp.asarray(cols), jnp.asarray(rows), 32)).reshape(64, 32)
    assert not np.allclose(emb, swapped)  # (r, c) and (c, r) differ off the diagonal
    with pytest.raises(ValueError, match="divisible by 4"):
        layers.sincos_2d(jnp.zeros(2), jnp.zeros(2), 30)
