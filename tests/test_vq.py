"""VQ-VAE quantizer: assignment, straight-through and commitment gradients, the EMA update against
a loop-by-loop numpy reference, reseeding of dead codes, tokenisation round trip, a short training
through the real trainer (EMA codebook as model state, checkpointed and reloaded), config errors."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_defaults, train
from mmjax.config_validation import ConfigError, validate
from mmjax.tokenizers import autoencoder as ae
from mmjax.tokenizers import vq


def numpy_ema_reference(codebook, count, total, z, indices, decay):
    """The EMA update of vq's docstring, one code and one vector at a time, in float64."""
    codebook, count, total = (np.array(a, np.float64) for a in (codebook, count, total))
    z = np.asarray(z, np.float64)
    for k in range(codebook.shape[0]):
        members = [z[i] for i in range(len(indices)) if indices[i] == k]
        s = np.sum(members, axis=0) if members else np.zeros(codebook.shape[1])
        count[k] = decay * count[k] + (1 - decay) * len(members)
        total[k] = decay * total[k] + (1 - decay) * s
        if count[k] > 1e-6:
            codebook[k] = total[k] / count[k]
    return codebook, count, total


def brute_nearest(z, codebook):
    d = ((np.asarray(z, np.float64)[:, None, :] - np.asarray(codebook, np.float64)[None]) ** 2).sum(-1)
    return d.argmin(-1)


def test_nearest_matches_brute_force_and_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3)).astype(np.float32)
    cb = rng.normal(size=(37, 3)).astype(np.float32)
    want = brute_nearest(z, cb)
    np.testing.assert_array_equal(np.asarray(vq.nearest_indices(jnp.asarray(z), jnp.asarray(cb))), want)
    monkeypatch.setattr(vq, "_MAX_DIST_ENTRIES", 37 * 7)  # 7 rows per block, 43 blocks, padded
    np.testing.assert_array_equal(np.asarray(vq.nearest_indices(jnp.asarray(z), jnp.asarray(cb))), want)


def test_straight_through_and_commitment_gradients():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    cb = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
    codes, idx, zq = vq.quantize(z, cb)
    np.testing.assert_allclose(codes, np.asarray(cb)[brute_nearest(z.reshape(-1, 3), cb)].reshape(z.shape),
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(zq), np.asarray(cb)[np.asarray(idx)])
    # straight-through: d/dz sum(w * q(z)) = w exactly; nothing flows into the codebook
    gz, gcb = jax.grad(lambda z, c: jnp.sum(w * vq.quantize(z, c)[0]), argnums=(0, 1))(z, cb)
    np.testing.assert_allclose(gz, w, atol=1e-6)
    assert float(jnp.abs(gcb).max()) == 0.0
    # commitment moves z towards its code, codebook loss moves the code towards z, no cross terms
    n = z.size
    g_commit = jax.grad(lambda z: vq.vq_losses(z, vq.quantize(z, cb)[2])[1])(z)
    np.testing.assert_allclose(g_commit, 2 * (z - zq) / n, rtol=1e-5, atol=1e-7)

    def codebook_loss(c):
        return vq.vq_losses(z, vq.quantize(z, c)[2])[0]
    g_cb = jax.grad(codebook_loss)(cb)
    want = np.zeros(cb.shape)
    for zi, k in zip(np.asarray(z).reshape(-1, 3), np.asarray(idx).reshape(-1)):
        want[k] += 2 * (np.asarray(cb)[k] - zi) / n
    np.testing.assert_allclose(g_cb, want, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(jax.grad(lambda z: vq.vq_losses(z, vq.quantize(z, cb)[2])[0])(z)).max()) == 0


def test_ema_update_matches_numpy_reference():
    rng = np.random.default_rng(2)
    k, d, n = 5, 2, 12
    state = vq.init_ema_state(jnp.asarray(rng.normal(size=(k, d)), jnp.float32))
    ref = (np.asarray(state["codebook"]), np.ones(k), np.asarray(state["codebook"]))
    for step in range(3):
        z = rng.normal(size=(n, d)).astype(np.float32)
        idx = rng.integers(0, k - 1, n)  # code k-1 is never assigned: it must keep its vector
        state = vq.ema_update(state, jnp.asarray(z), jnp.asarray(idx, jnp.int32), 0.9)
        ref = numpy_ema_reference(*ref, z, idx, 0.9)
        np.testing.assert_allclose(state["codebook"], ref[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["ema_count"], ref[1], rtol=1e-5)
        np.testing.assert_allclose(state["ema_sum"], ref[2], rtol=1e-5, atol=1e-6)
        assert int(state["unused"][k - 1]) == step + 1
    np.testing.assert_allclose(state["codebook"][k - 1], ref[0][k - 1], rtol=1e-5)


def _cluster_data(rng, n):
    centres = np.array([[3, 3], [-3, 3], [3, -3], [-3, -3], [0, 5], [5, 0]], np.float32)
    return centres[rng.integers(0, len(centres), n)] + 0.1 * rng.normal(size=(n, 2)).astype(np.float32)


@pytest.mark.parametrize("reseed_after", [0, 2])
def test_reseeding_revives_dead_codes(reseed_after):
    """A codebook started far from the data collapses onto one code without reseeding; with it,
    dead codes come back from encoder outputs and cover the clusters."""
    rng = np.random.default_rng(3)
    state = vq.init_ema_state(jnp.asarray(50.0 + rng.normal(size=(8, 2)), jnp.float32))
    key = jax.random.PRNGKey(0)
    for step in range(30):
        z = jnp.asarray(_cluster_data(rng, 64))
        _, idx, _ = vq.quantize(z, state["codebook"])
        state = vq.ema_update(state, z, idx, 0.8)
        if reseed_after:
            state = vq.reseed(state, z, jax.random.fold_in(key, step), reseed_after)
    _, idx, _ = vq.quantize(jnp.asarray(_cluster_data(rng, 512)), state["codebook"])
    used = len(np.unique(np.asarray(idx)))
    if reseed_after:
        assert used >= 6  # every cluster has a code
        assert float(jnp.abs(state["codebook"]).max()) < 10  # no code is left out at 50
    else:
        assert used == 1


def test_reseed_replaces_only_dead_codes_with_batch_rows():
    rng = np.random.default_rng(4)
    state = vq.init_ema_state(jnp.asarray(rng.normal(size=(6, 3)), jnp.float32))
    state = {**state, "unused": jnp.asarray([0, 5, 1, 7, 0, 4], jnp.int32)}
    z = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    new = vq.reseed(state, z, jax.random.PRNGKey(1), 4)
    dead = np.array([0, 1, 0, 1, 0, 1], bool)
    np.testing.assert_array_equal(np.asarray(new["codebook"])[~dead], np.asarray(state["codebook"])[~dead])
    for row in np.asarray(new["codebook"])[dead]:
        assert np.abs(np.asarray(z) - row).max(-1).min() < 0.05  # a batch row, up to the jitter
    np.testing.assert_array_equal(new["unused"], np.where(dead, 0, state["unused"]))
    np.testing.assert_array_equal(new["ema_count"], np.where(dead, 1.0, 1.0))


def tiny_config(**vq_fields):
    c = config_defaults.base_config()
    del c.model, c.objective, c.train, c.sample
    c.fsq.quantizer = "vq"
    c.fsq.channels = (8, 16)
    c.fsq.norm_groups = 4
    c.fsq.vq_codebook_size = 32
    c.fsq.vq_dim = 3
    for k, v in vq_fields.items():
        c.fsq[k] = v
    return c


@pytest.mark.parametrize("ema", [True, False])
def test_tokenize_round_trip(ema):
    cfg = tiny_config(vq_ema_decay=0.99 if ema else 0.0, vq_l2=ema)
    model = ae.autoencoder_from_config(cfg)
    assert isinstance(model, vq.VQAutoencoder) and model.codebook_size == 32
    variables = nn.unbox(ae.init_variables(model, jax.random.PRNGKey(0), 16))
    assert ("vq" in variables) == ema and ("codebook" in variables["params"]) == (not ema)
    weights = variables if ema else variables["params"]
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
    tokens = ae.tokenize(model, weights, images)
    assert tokens.shape == (2, 64) and tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    codes = model.apply(variables, images, method=vq.VQAutoencoder.encode)
    direct = model.apply(variables, codes, method=vq.VQAutoencoder.decode)
    np.testing.assert_allclose(ae.detokenize(model, weights, tokens, (8, 8)), direct, atol=1e-6)
    recon, indices = ae.make_recon_fn(model, weights)(images)
    np.testing.assert_array_equal(indices, tokens)
    assert recon.dtype == jnp.uint8


def test_training_loss_falls_and_codebook_state_is_checkpointed(tmp_path):
    """The real trainer on natural crops: loss falls, the EMA codebook moves (model state), the tokenizer
    reloads from the checkpoint with its trained codebook and evaluates."""
    from mmjax import stages
    from mmjax.metrics_writer import read_jsonl
    from mmjax.stages.tokenizer import evaluate as evaluate_tokenizer
    from mmjax.stages.tokenizer import load_tokenizer
    from mmjax.tasks.tokenizer import TokenizerTask
    from mmjax.workdir import Workdir
    cfg = tiny_config(vq_reseed=5)
    cfg.data.num_train, cfg.data.num_validation, cfg.data.num_test = 64, 16, 16
    cfg.data.image_size, cfg.data.name = 16, "natural"
    tc = cfg.tokenizer_train
    tc.steps, tc.batch_size, tc.warmup_steps, tc.lr = 40, 8, 4, 3e-3
    tc.log_every, tc.checkpoint_every, tc.eval_batches, tc.progress_bar = 4, 40, 1, False
    validate(cfg)
    wd = Workdir.from_config(cfg, tmp_path)
    stages.data.run(cfg, wd)
    summary = train.train(cfg, wd, TokenizerTask(cfg, wd.data_dir))
    rows = [r for r in read_jsonl(os.path.join(tmp_path, "tokenizer", "train_metrics.jsonl"))
            if "loss" in r]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    trained = summary["state"]["model_state"]["codebook"]
    model, weights = load_tokenizer(cfg, wd)
    np.testing.assert_array_equal(weights["vq"]["codebook"], trained)
    init = nn.unbox(ae.init_variables(model, jax.random.PRNGKey(cfg.seed), 16))["vq"]["codebook"]
    assert float(jnp.abs(trained - init).max()) > 1e-3
    # precomputed tokens for the model stage, as for FSQ (image_tokens), equal direct tokenisation
    from mmjax.data import image_tokens, pipeline
    meta = stages.tokenize.tokenize_split(cfg, wd, "validation", model, weights, 40)
    assert meta["quantizer"] == "vq" and meta["codebook_size"] == 32
    ds = pipeline.image_caption_dataset(cfg.data, "validation", wd.data_dir)
    stored = image_tokens.load_tokens(wd, "validation", len(ds))
    images = np.stack([ds[i]["image"] for i in range(len(ds))])
    np.testing.assert_array_equal(np.stack([stored[i] for i in range(len(ds))]),
                                  ae.tokenize(model, weights, jnp.asarray(images)))
    metrics = evaluate_tokenizer(cfg, wd)
    assert metrics["codebook_size"] == 32 and 0 < metrics["validation_usage"] <= 1
    with open(os.path.join(tmp_path, "tokenizer", "eval_validation.json")) as f:
        assert json.load(f)["codebook_size"] == 32


def test_grad_accum_threads_model_state():
    """Two microbatches update the EMA state twice, in order (as two steps on the halves would)."""
    from mmjax.tasks.tokenizer import TokenizerTask
    cfg = tiny_config()
    task = TokenizerTask(cfg, None)
    images = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    batch = {"image": jnp.asarray(images)}
    params = nn.unbox(task.init_params(jax.random.PRNGKey(0), batch))
    ms = task.init_model_state(jax.random.PRNGKey(0), batch)
    _, _, _, got = train._grads(task, params, ms, batch, jax.random.PRNGKey(1), 2)
    want = ms
    for half in (images[0::2], images[1::2]):  # _grads takes every 2nd example per microbatch
        _, (_, want) = task.loss_fn_with_state(params, want, {"image": jnp.asarray(half)},
                                               jax.random.PRNGKey(1), True)
    np.testing.assert_allclose(got["ema_count"], want["ema_count"], rtol=1e-6)
    np.testing.assert_allclose(got["codebook"], want["codebook"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value,needle", [
    ("quantizer", "rvq", "fsq.quantizer"),
    ("vq_codebook_size", 1, "fsq.vq_codebook_size"),
    ("vq_ema_decay", 1.0, "fsq.vq_ema_decay"),
    ("vq_dim", 0, "fsq.vq_dim"),
])
def test_bad_vq_fields_fail_naming_the_field(field, value, needle):
    cfg = tiny_config(**{field: value})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(cfg)


def test_reseed_needs_ema():
    with pytest.raises(ConfigError, match=r"fsq\.vq_reseed=3.*vq_ema_decay"):
        validate(tiny_config(vq_reseed=3, vq_ema_decay=0.0))
