"""Losses: index NLL / digits against brute force, time sampling, finite losses and gradients
with empty masks, and a few optimizer steps that make text CE and the image loss (flow MSE, or
factorised FSQ-index CE) fall."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import config_defaults, config_validation, objectives
from mmjax.models import heads
from mmjax.tokenizers.fsq import FSQ
from test_masks import packed_batch
from test_mot import LEVELS, VOCAB, build, key, tiny_cfg

ROWS = [[("t2i", 3, 6), ("i2t", 2, 4)], [("t2i", 1, 8), ("t2i", 0, 5)]]


def test_index_digits_and_nll_match_brute_force():
    fsq = FSQ(LEVELS)
    idx = np.arange(fsq.codebook_size)
    digits = np.asarray(heads.indices_to_digits(jnp.asarray(idx), LEVELS))
    codes = fsq.indices_to_codes(idx)
    np.testing.assert_array_equal(digits, np.round(codes * fsq.half_width + fsq.half_width))
    np.testing.assert_array_equal(heads.digits_to_indices(jnp.asarray(digits), LEVELS), idx)

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        return x - np.log(np.exp(x - x.max()).sum()) - x.max()

    rng = np.random.default_rng(0)
    targets = rng.integers(0, fsq.codebook_size, (3,))
    factor = tuple(rng.normal(size=(3, n)).astype(np.float32) for n in LEVELS)
    want = [-sum(log_softmax(factor[c][i])[digits[targets[i], c]] for c in range(len(LEVELS)))
            for i in range(3)]
    got = heads.index_nll(tuple(map(jnp.asarray, factor)), jnp.asarray(targets), LEVELS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    joint = rng.normal(size=(3, fsq.codebook_size)).astype(np.float32)
    want = [-log_softmax(joint[i])[targets[i]] for i in range(3)]
    got = heads.index_nll((jnp.asarray(joint),), jnp.asarray(targets), LEVELS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    best = [int(np.argmax(f[0])) for f in factor]
    got = heads.index_argmax(tuple(jnp.asarray(f[:1]) for f in factor), LEVELS)
    assert int(got[0]) == int(np.sum(np.asarray(best) * fsq.basis))


def test_time_sampling():
    obj = config_defaults.objective_config()
    typed = config_validation.objective_config
    t = np.asarray(objectives.sample_t(key(0), (20000,), typed(obj)))
    assert 0 <= t.min() and t.max() <= 1 and abs(t.mean() - 0.5) < 0.02
    obj.flow_t_dist, obj.flow_logit_std = "logit_normal", 2.0
    t = np.asarray(objectives.sample_t(key(0), (20000,), typed(obj)))
    assert ((t < 0.1) | (t > 0.9)).mean() > 0.25  # ~0.27 vs 0.2 for uniform
    obj.flow_t_dist = "beta"
    with pytest.raises(ValueError, match="flow_t_dist"):
        objectives.sample_t(key(0), (3,), typed(obj))  # the typed block refuses it


def _train(cfg, obj, steps):
    """Adam on one fixed batch (fixed rng: the loss is a deterministic function of the params).
    Also checks, with the same compiled step, that empty masks give finite losses/gradients."""
    batch = packed_batch(ROWS, 24, VOCAB, LEVELS, seed=2)
    model, params = build(cfg, batch)
    objective = config_validation.objective_config(obj)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch):
        grad_fn = jax.value_and_grad(objectives.compute_losses, argnums=1, has_aux=True)
        (loss, metrics), grads = grad_fn(model, params, batch, key(3), objective, train=True)
        updates, opt_state = tx.update(grads, opt_state, params)
        gnorm = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics, gnorm

    opt_state = tx.init(params)
    empty_image = dict(batch, image_mask=np.zeros_like(batch["image_mask"]))
    nothing = dict(empty_image, text_mask=np.zeros_like(batch["text_mask"]))
    for b in (empty_image, nothing):
        _, _, m, gnorm = step(params, opt_state, b)
        assert all(np.isfinite(v) for v in m.values()) and np.isfinite(gnorm)
        assert float(m["image_loss"]) == 0.0 and float(m["image_tokens"]) == 0.0
    assert float(m["loss"]) == 0.0 and float(m["text_tokens"]) == 0.0

    history = []
    for _ in range(steps):
        params, opt_state, m, _ = step(params, opt_state, batch)
        history.append({k: float(v) for k, v in m.items()})
    return history


def test_flow_training_reduces_text_and_flow_loss():
    cfg = tiny_cfg(num_modalities=2, noise_aug=0.1)
    obj = config_defaults.objective_config()
    obj.flow_t_dist = "logit_normal"
    h = _train(cfg, obj, 30)
    assert {"loss", "text_loss", "text_ppl", "text_accuracy", "text_tokens", "image_loss",
            "flow_mse", "image_tokens"} <= set(h[0])
    assert h[0]["image_tokens"] > 10 and h[0]["text_tokens"] > 10
    assert h[-1]["text_loss"] < 0.5 * h[0]["text_loss"], (h[0], h[-1])
    assert h[-1]["flow_mse"] < 0.7 * h[0]["flow_mse"], (h[0], h[-1])
    np.testing.assert_allclose(h[0]["text_ppl"], math.exp(h[0]["text_loss"]), rtol=1e-4)
    np.testing.assert_allclose(h[0]["loss"], h[0]["text_loss"] + h[0]["image_loss"], rtol=1e-5)


def test_discrete_factorized_training_reduces_index_ce():
    cfg = tiny_cfg(num_modalities=2, image_head="discrete", discrete_factorized=True)
    obj = config_defaults.objective_config()  # (the discrete head reads only the weights)
    obj.update(text_weight=0.5, image_weight=2.0)
    h = _train(cfg, obj, 30)
    assert h[-1]["image_loss"] < 0.5 * h[0]["image_loss"], (h[0], h[-1])
    assert h[-1]["text_loss"] < 0.5 * h[0]["text_loss"], (h[0], h[-1])
    np.testing.assert_allclose(h[0]["image_bits_per_code"], h[0]["image_loss"] / math.log(2),
                               rtol=1e-5)
    np.testing.assert_allclose(h[0]["loss"], 0.5 * h[0]["text_loss"] + 2 * h[0]["image_loss"],
                               rtol=1e-5)
    assert h[-1]["image_accuracy"] > h[0]["image_accuracy"]
