"""Sampling: KV-cached decode loops == full forward on the sampled sequence (teacher forcing) for
image tokens (hidden, LM logits, flow velocities, the guided ODE end point) and for captions;
samples lie on the FSQ grid; rows are independent; the interleaved chain's first round equals
text->image then image->text; discrete-head CFG picks the guided argmax; the ODE integrators and
the logit filters (temperature, top-k, top-p) are right on hand-made inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_defaults, config_validation, sampling
from mmjax.layout import SpecialIds
from mmjax.models import heads
from mmjax.models.model import MultimodalLM
from mmjax.tokenizers.fsq import FSQ
from test_mot import LEVELS, build, key, tiny_cfg

SPECIAL = SpecialIds(bos=2, eos=3, boi=4, eoi=5, uncond=6)
N = 6  # image tokens per image
L = 24  # full-forward length
FSQ_ = FSQ(LEVELS)
CAPTIONS = np.array([[7, 8, 9, 0, 0], [10, 11, 12, 13, 14], [6, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([3, 5, 1], np.int32)
SETTINGS = sampling.SampleSettings(temperature=1.0, max_text_len=7, ode_steps=3, ode_solver="heun",
                                   cfg_scale=2.5)


UNCOND = np.full((3, 1), SPECIAL.uncond, np.int32)  # the CFG-unconditional captions


def example_batch(length=8):
    batch = {k: jnp.zeros((1, length), jnp.int32)
             for k in ("tokens", "modality", "positions", "segment_ids", "image_block", "image_pos")}
    return {**batch, "codes": jnp.zeros((1, length, len(LEVELS)))}


def pack(rows):
    """rows: [(tokens, modality, image_block)] -> full-forward batch of one document per row."""
    out = {k: np.zeros((len(rows), L), np.int32)
           for k in ("tokens", "modality", "positions", "segment_ids", "image_block")}
    for r, (tokens, modality, block) in enumerate(rows):
        n = len(tokens)
        out["tokens"][r, :n], out["modality"][r, :n] = tokens, modality
        out["image_block"][r, :n] = block
        out["positions"][r, :n], out["segment_ids"][r, :n] = np.arange(n), 1
    out["codes"] = np.where((out["modality"] == 1)[..., None],
                            FSQ_.indices_to_codes(out["tokens"]), 0.0).astype(np.float32)
    is_img = out["modality"] == 1  # one image per row: its index is the running count
    out["image_pos"] = np.where(is_img, np.cumsum(is_img, axis=1) - 1, -1).astype(np.int32)
    return out


def t2i_rows(captions, lengths, indices):
    rows = []
    for cap, n_cap, idx in zip(captions, lengths, np.asarray(indices)):
        tokens = [SPECIAL.bos, *cap[:n_cap], SPECIAL.boi, *idx]
        rows.append((tokens, [0] * (n_cap + 2) + [1] * N, [0] * len(tokens)))
    return rows


def i2t_rows(indices, tokens):
    rows = []
    for idx, tok in zip(np.asarray(indices), np.asarray(tokens)):
        layout = [0, 0] + [1] * N + [0] * (1 + len(tok))  # image positions: modality 1, block 1
        rows.append(([SPECIAL.bos, SPECIAL.boi, *idx, SPECIAL.eoi, *tok], layout, layout))
    return rows


@pytest.fixture(scope="module")
def flow():
    model, params = build(tiny_cfg(num_modalities=2, num_layers=1), example_batch())
    sampler = sampling.Sampler(model, SETTINGS, SPECIAL, N, collect=True)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
    t2i = sampler.text_to_image(params, CAPTIONS, LENGTHS, key(0))
    return dict(model=model, params=params, sampler=sampler, forward=forward, t2i=t2i)


def _heads(model, params, hidden, seed=0):
    """LM logits and flow velocities (at random x_t, t) of hidden states [B, T, D]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=hidden.shape[:-1] + (len(LEVELS),)).astype(np.float32)
    t = rng.uniform(size=hidden.shape[:-1]).astype(np.float32)
    lm, vel = _jitted_heads(model)(params, jnp.asarray(hidden), x, t)
    return np.asarray(lm), np.asarray(vel)


_HEADS = {}


def _jitted_heads(model):
    if id(model) not in _HEADS:
        _HEADS[id(model)] = jax.jit(lambda p, h, x, t: (
            model.apply({"params": p}, h, method=MultimodalLM.lm_logits),
            model.apply({"params": p}, h, x, t, method=MultimodalLM.flow_velocity)))
    return _HEADS[id(model)]


def test_image_decoding_matches_teacher_forcing(flow):
    model, params, out = flow["model"], flow["params"], flow["t2i"]
    full = flow["forward"](params, pack(t2i_rows(CAPTIONS, LENGTHS, out["indices"])))
    rows = np.arange(3)[:, None]
    expected = np.asarray(full)[rows, (LENGTHS + 1)[:, None] + np.arange(N)]  # <boi>, img_1..
    got = np.asarray(out["hidden"])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    for a, b in zip(_heads(model, params, got), _heads(model, params, expected)):
        assert np.abs(b).mean() > 1e-2  # perturbed params: the heads are not trivially zero
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_guided_ode_endpoint_matches_full_forward(flow):
    """Re-derives every sampled code from full-forward hidden states of the cond and the
    caption-dropped sequences: CFG mix, per-row keys, Heun steps and snapping all agree."""
    _check_guided_codes(flow, flow["t2i"], np.full(N, SETTINGS.cfg_scale, np.float32))


def test_linear_cfg_schedule_guides_token_k_at_its_own_scale(flow):
    """sample.cfg_schedule='linear': token k is guided at 1 + (s - 1)(k + 1)/N (MAR), re-derived
    from full forwards as above; the constant schedule's samples differ."""
    settings = dataclasses.replace(SETTINGS, cfg_schedule="linear")
    out = jax.jit(lambda p, c, n, r: sampling.text_to_image(
        p, flow["model"], c, n, r, settings=settings, special=SPECIAL, num_image_tokens=N))(
            flow["params"], CAPTIONS, LENGTHS, key(0))
    scales = 1 + (SETTINGS.cfg_scale - 1) * (np.arange(N) + 1) / N
    _check_guided_codes(flow, out, scales.astype(np.float32))
    assert (np.asarray(out["indices"]) != np.asarray(flow["t2i"]["indices"])).any()
    assert float(sampling.cfg_scale_at(settings, N - 1, N)) == pytest.approx(SETTINGS.cfg_scale)
    assert float(sampling.cfg_scale_at(SETTINGS, 0, N)) == SETTINGS.cfg_scale


def _check_guided_codes(flow, out, scales):
    """Every code of `out` equals the snapped Heun endpoint of v_u + scales[i] (v_c - v_u) at
    token i, with the sampler's per-row, per-token noise."""
    model, params = flow["model"], flow["params"]
    cond = np.asarray(flow["forward"](params, pack(t2i_rows(CAPTIONS, LENGTHS, out["indices"]))))
    uncond = np.asarray(flow["forward"](params, pack(t2i_rows(UNCOND, [1] * 3, out["indices"]))))
    h_c = cond[np.arange(3)[:, None], (LENGTHS + 1)[:, None] + np.arange(N)]
    h_u = uncond[:, 2:2 + N]  # <bos> <uncond> <boi> img ...: <boi> predicts img_1
    keys = sampling._fold(sampling.row_keys(key(0), 3), 0)
    x0 = jnp.stack([jax.vmap(lambda k: jax.random.normal(k, (len(LEVELS),)))(
        sampling._fold(keys, jnp.int32(i))) for i in range(N)], axis=1)  # as the sampler draws

    def velocity(x, t):
        t = jnp.full(x.shape[:-1], t)
        v_c, v_u = (model.apply({"params": params}, h, x, t, method=MultimodalLM.flow_velocity)
                    for h in (h_c, h_u))
        return v_u + jnp.asarray(scales)[None, :, None] * (v_c - v_u)

    x1 = jax.jit(lambda x: sampling.integrate_flow(velocity, x, SETTINGS.ode_steps, "heun"))(x0)
    np.testing.assert_array_equal(FSQ_.snap(np.asarray(x1)), np.asarray(out["codes"]))


def test_samples_lie_on_the_fsq_grid(flow):
    index, codes = np.asarray(flow["t2i"]["indices"]), np.asarray(flow["t2i"]["codes"])
    assert index.shape == (3, N) and codes.shape == (3, N, len(LEVELS))
    assert ((index >= 0) & (index < FSQ_.codebook_size)).all()
    np.testing.assert_array_equal(FSQ_.snap(codes), codes)
    np.testing.assert_array_equal(FSQ_.indices_to_codes(index), codes)
    assert len(np.unique(index)) > N  # not a constant image


def test_rows_are_independent(flow):
    params, t2i = flow["params"], flow["sampler"].text_to_image
    other = CAPTIONS.copy()
    other[1:] = [20, 21, 22, 23, 0]  # rows 1 and 2: the same new prompt
    out = t2i(params, other, np.array([3, 4, 4], np.int32), key(0))
    np.testing.assert_array_equal(out["indices"][0], flow["t2i"]["indices"][0])
    np.testing.assert_array_equal(out["codes"][0], flow["t2i"]["codes"][0])
    assert (np.asarray(out["indices"][1]) != np.asarray(out["indices"][2])).any()  # own keys

    i2t = flow["sampler"].image_to_text
    codes = np.asarray(flow["t2i"]["codes"])
    a = i2t(params, codes, key(1))["tokens"]
    b = i2t(params, np.concatenate([codes[:1], codes[:1], codes[:1]]), key(1))["tokens"]
    np.testing.assert_array_equal(a[0], b[0])
    assert (np.asarray(b[1]) != np.asarray(b[2])).any()


def test_bad_inputs_fail_before_compiling(flow):
    sampler, params = flow["sampler"], flow["params"]
    with pytest.raises(ValueError, match="caption_lengths"):
        sampler.text_to_image(params, CAPTIONS, np.array([3, 6, 1]), key(0))  # 6 > width 5
    with pytest.raises(ValueError, match="caption_lengths"):
        sampler.interleaved(params, CAPTIONS, LENGTHS[:2], key(0))
    with pytest.raises(ValueError, match="image_codes"):
        sampler.image_to_text(params, np.zeros((3, N, 3), np.float32), key(0))


def test_caption_decoding_matches_teacher_forcing(flow):
    model, params = flow["model"], flow["params"]
    index = flow["t2i"]["indices"]
    out = flow["sampler"].image_to_text(params, flow["t2i"]["codes"], key(1))
    tokens, lengths, seen = (np.asarray(out[k]) for k in ("tokens", "lengths", "hidden"))
    t = SETTINGS.max_text_len
    assert tokens.shape == (3, t) and ((lengths >= 0) & (lengths <= t)).all()
    for r in range(3):  # after <eos>: only padding
        assert (tokens[r, lengths[r] + 1:] == sampling.PAD_ID).all()
        assert lengths[r] == t or tokens[r, lengths[r]] == SPECIAL.eos
    full = np.asarray(flow["forward"](params, pack(i2t_rows(index, tokens))))
    expected = full[:, N + 2:N + 2 + t]  # <eoi> predicts the first caption token
    lm_got, lm_want = (_heads(model, params, h)[0] for h in (seen, expected))
    for r in range(3):
        upto = min(lengths[r] + 1, t)  # the steps that produced this row's tokens
        np.testing.assert_allclose(seen[r, :upto], expected[r, :upto], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(lm_got[r, :upto], lm_want[r, :upto], atol=1e-4, rtol=1e-4)


def test_interleaved_first_round_equals_t2i_then_i2t(flow):
    params, sampler = flow["params"], flow["sampler"]
    out = sampler.interleaved(params, CAPTIONS, LENGTHS, key(0), rounds=2)
    assert out["indices"].shape == (3, 2, N)
    assert out["tokens"].shape == (3, 2, SETTINGS.max_text_len)
    np.testing.assert_array_equal(out["indices"][:, 0], flow["t2i"]["indices"])
    caption = sampler.image_to_text(params, flow["t2i"]["codes"], key(0))
    np.testing.assert_array_equal(out["tokens"][:, 0], caption["tokens"])
    np.testing.assert_array_equal(out["lengths"][:, 0], caption["lengths"])
    codes = np.asarray(out["codes"][:, 1])
    np.testing.assert_array_equal(FSQ_.snap(codes), codes)
    assert (np.asarray(out["indices"][:, 1]) != np.asarray(out["indices"][:, 0])).any()


def test_discrete_head_greedy_cfg_picks_guided_argmax():
    # Dense (one modality: image tokens share the text weights) keeps this compile cheap.
    cfg = tiny_cfg(num_modalities=1, num_layers=1, image_head="discrete", discrete_factorized=True)
    model, params = build(cfg, example_batch(), seed=3)
    settings = sampling.SampleSettings(cfg_scale=3.0, image_temperature=0.0, max_text_len=4)
    out = jax.jit(lambda p, c, n, r: sampling.text_to_image(
        p, model, c, n, r, settings=settings, special=SPECIAL, num_image_tokens=N))(
            params, CAPTIONS, LENGTHS, key(0))
    index, codes = np.asarray(out["indices"]), np.asarray(out["codes"])
    assert ((index >= 0) & (index < FSQ_.codebook_size)).all()
    np.testing.assert_array_equal(FSQ_.indices_to_codes(index), codes)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
    cond = np.asarray(forward(params, pack(t2i_rows(CAPTIONS, LENGTHS, index))))
    uncond = np.asarray(forward(params, pack(t2i_rows(UNCOND, [1] * 3, index))))
    h_c = cond[np.arange(3)[:, None], (LENGTHS + 1)[:, None] + np.arange(N)]
    lc, lu = (model.apply({"params": params}, h, method=MultimodalLM.index_logits)
              for h in (h_c, uncond[:, 2:2 + N]))
    guided = tuple(u + 3.0 * (c - u) for c, u in zip(lc, lu))
    np.testing.assert_array_equal(index, np.asarray(heads.index_argmax(guided, LEVELS)))
    assert (index != np.asarray(heads.index_argmax(lc, LEVELS))).any()  # guidance mattered


# ---- pure pieces ---------------------------------------------------------------------------
def test_integrators_agree_on_a_smooth_field():
    velocity = lambda x, t: -2.0 * t * x  # noqa: E731  x(1) = x0 / e
    x0 = jnp.array([1.0, -2.0, 0.5])
    exact = np.asarray(x0) * np.exp(-1.0)

    def run(steps, solver):
        return np.asarray(sampling.integrate_flow(velocity, x0, steps, solver))

    fine_euler, heun = run(2000, "euler"), run(16, "heun")
    np.testing.assert_allclose(fine_euler, heun, atol=1e-3)
    np.testing.assert_allclose(heun, exact, atol=1e-3)
    assert np.abs(run(16, "euler") - exact).max() > 10 * np.abs(heun - exact).max()
    # A straight rectified-flow path (constant velocity) is exact in one Euler step.
    target = jnp.array([0.25, -1.0, 0.75])
    np.testing.assert_allclose(sampling.integrate_flow(lambda x, t: target - x0, x0, 1), target)
    with pytest.raises(ValueError, match="ode_solver"):
        sampling.integrate_flow(velocity, x0, 4, "rk4")


LOGITS = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))  # ranks: 1, 3, 2, 0


def kept(**kw):
    return np.isfinite(np.asarray(sampling.filter_logits(LOGITS, **kw)))[0].tolist()


def test_filter_logits_on_hand_made_logits():
    np.testing.assert_allclose(sampling.filter_logits(LOGITS, temperature=2.0), LOGITS / 2.0)
    assert kept() == [True] * 4
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_k=9) == [True] * 4  # k >= vocab: no-op
    assert kept(top_p=0.7) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(top_p=0.5) == [False, True, False, False]  # the top token alone reaches 0.5
    assert kept(top_p=0.51) == [False, True, False, True]
    # top-p acts on the top-k renormalised distribution: 0.8 / 0.95 > 0.83 drops the third token.
    assert kept(top_k=3, top_p=0.83) == [False, True, False, True]
    assert kept(top_k=3, top_p=0.85) == [False, True, True, True]
    # ... and after the temperature: a flat distribution keeps more tokens.
    assert kept(temperature=100.0, top_p=0.7) == [False, True, True, True]
    assert kept(temperature=0.0) == [False, True, False, False]  # greedy
    ties = sampling.filter_logits(jnp.array([[1.0, 3.0, 3.0]]), temperature=0.0)
    assert np.isfinite(np.asarray(ties))[0].tolist() == [False, True, False]
    # Rows are filtered independently.
    two = sampling.filter_logits(jnp.concatenate([LOGITS, LOGITS[:, ::-1]]), top_k=1)
    assert np.isfinite(np.asarray(two)).tolist() == [[False, True, False, False],
                                                       [False, False, True, False]]


def test_sampling_frequencies_follow_the_filtered_distribution():
    keys = jax.random.split(key(0), 4000)
    draws = np.asarray(sampling.sample_rows(keys, jnp.repeat(LOGITS, 4000, 0), top_k=2))
    assert set(np.unique(draws)) == {1, 3}
    assert abs(np.mean(draws == 1) - 0.5 / 0.8) < 0.03
    greedy = sampling.sample_rows(keys[:5], jnp.repeat(LOGITS, 5, 0), temperature=0.0)
    assert np.asarray(greedy).tolist() == [1] * 5


def test_settings_from_config_and_validation():
    cfg = config_defaults.sample_config()
    s = config_validation.sample_settings(cfg)
    assert s.ode_steps == cfg.ode_steps and s.cfg_scale == cfg.cfg_scale and s.guided
    assert not sampling.SampleSettings(cfg_scale=1.0).guided

    def settings(**kw):  # the sample block with `kw` changed, through the one validator
        return config_validation.sample_settings(dict(cfg.to_dict(), **kw))

    with pytest.raises(ValueError, match="sample.top_p"):
        settings(top_p=0.0)
    with pytest.raises(ValueError, match="sample.ode_solver"):
        settings(ode_solver="rk4")
    with pytest.raises(ValueError, match="sample.cfg_schedule='cosine'"):
        settings(cfg_schedule="cosine")
    assert settings(cfg_schedule="linear").cfg_schedule == "linear"
    del cfg.ode_steps
    with pytest.raises(ValueError, match="ode_steps"):
        config_validation.sample_settings(cfg)


def test_uncond_prompt_is_the_packers_caption_dropped_prefix():
    """Training rows and CFG prompts agree: the sampler's unconditional prompt is, token for
    token, the prefix up to <boi> of the packer's caption-dropped text->image document, and it
    is not the prefix of an image->caption document."""
    from mmjax.data import packing
    image = np.arange(N)
    codes = FSQ_.indices_to_codes(image)
    dropped = packing.build_document([7, 8], image, codes, "t2i", SPECIAL, drop_caption=True)
    i2t = packing.build_document([7, 8], image, codes, "i2t", SPECIAL)
    ids, lengths = sampling.uncond_prompt(jnp.asarray(CAPTIONS), SPECIAL)
    tokens, valid, next_pos = sampling._t2i_prompt(ids, lengths, SPECIAL)
    for r in range(3):
        prompt = np.asarray(tokens[r])[np.asarray(valid[r])].tolist()
        assert prompt == dropped["tokens"][:int(next_pos[r])].tolist() == [2, 6, 4]
        assert prompt != i2t["tokens"][:len(prompt)].tolist()


INPUT_SCHEMES = [("learned_2d", "code"), ("sincos_2d", "code+index"), ("rope_2d", "code")]


@pytest.fixture(scope="module", params=INPUT_SCHEMES, ids=["+".join(p) for p in INPUT_SCHEMES])
def grid(request):
    """A model with 2-D image positions (a 3-wide grid: N = 6 tokens are 2 rows), learned or
    fixed, the second also embedding each image token's index."""
    positions, image_input = request.param
    cfg = dataclasses.replace(tiny_cfg(num_modalities=2, num_layers=1),
                              image_positions=positions, image_input=image_input, image_side=3)
    model, params = build(cfg, example_batch())
    assert ({"image_row", "image_col"} <= set(params)) == (positions == "learned_2d")
    return model, params


def test_image_input_schemes_cached_decoding_matches_teacher_forcing(grid):
    """Sampler chunks carry image_pos exactly as the packer does, for images and captions."""
    model, params = grid
    sampler = sampling.Sampler(model, SETTINGS, SPECIAL, N, collect=True)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
    out = sampler.text_to_image(params, CAPTIONS, LENGTHS, key(0))
    full = np.asarray(forward(params, pack(t2i_rows(CAPTIONS, LENGTHS, out["indices"]))))
    expected = full[np.arange(3)[:, None], (LENGTHS + 1)[:, None] + np.arange(N)]
    np.testing.assert_allclose(np.asarray(out["hidden"]), expected, atol=1e-4, rtol=1e-4)
    text = sampler.image_to_text(params, out["codes"], key(1))
    seen, lengths = np.asarray(text["hidden"]), np.asarray(text["lengths"])
    full = np.asarray(forward(params, pack(i2t_rows(out["indices"], np.asarray(text["tokens"])))))
    for r in range(3):
        upto = min(lengths[r] + 1, SETTINGS.max_text_len)
        np.testing.assert_allclose(seen[r, :upto], full[r, N + 2:N + 2 + upto], atol=1e-4,
                                   rtol=1e-4)
    # The positions matter: the same image with its tokens' indices shifted reads differently.
    batch = pack(t2i_rows(CAPTIONS, LENGTHS, out["indices"]))
    shifted = dict(batch, image_pos=np.where(batch["image_pos"] >= 0, (batch["image_pos"] + 3) % 6,
                                             -1).astype(np.int32))
    assert not np.allclose(np.asarray(forward(params, shifted)), np.asarray(forward(params, batch)),
                           atol=1e-4)


def test_inference_noise_aug_feeds_back_noisy_codes(flow):
    """sample.noise_aug: the returned tokens are clean FSQ codes, while every state after the
    first is the full forward over the codes plus the sampler's (reproduced) noise."""
    model, params = flow["model"], flow["params"]
    settings = sampling.SampleSettings(**{**SETTINGS.__dict__, "cfg_scale": 1.0, "noise_aug": 0.3})
    out = jax.jit(lambda p, c, n, r: sampling.text_to_image(
        p, model, c, n, r, settings=settings, special=SPECIAL, num_image_tokens=N, collect=True))(
            params, CAPTIONS, LENGTHS, key(0))
    codes = np.asarray(out["codes"])
    np.testing.assert_array_equal(FSQ_.snap(codes), codes)
    keys = sampling._fold(sampling.row_keys(key(0), 3), 0)
    noise = np.stack([np.asarray(jax.vmap(lambda k: jax.random.normal(k, (len(LEVELS),)))(
        sampling._fold(sampling._fold(keys, jnp.int32(i)), sampling.NOISE_STREAM)))
        for i in range(N)], axis=1)
    batch = pack(t2i_rows(CAPTIONS, LENGTHS, out["indices"]))
    rows = np.arange(3)[:, None]
    img = (LENGTHS + 2)[:, None] + np.arange(N)  # the image tokens' positions
    batch["codes"][rows, img] += 0.3 * noise
    full = np.asarray(flow["forward"](params, batch))
    expected = full[rows, img - 1]
    np.testing.assert_allclose(np.asarray(out["hidden"]), expected, atol=1e-4, rtol=1e-4)
    clean = np.asarray(flow["forward"](params, pack(t2i_rows(CAPTIONS, LENGTHS, out["indices"]))))
    assert not np.allclose(np.asarray(out["hidden"])[:, 1:], clean[rows, img - 1][:, 1:], atol=1e-3)
