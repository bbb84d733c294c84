"""EMA of the params (mmjax/ema.py): the formula, the trainer keeping it without changing the
training trajectory, resume == uninterrupted with it, and which weights sampling reads."""
import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from mmjax import config_defaults, config_validation, ema, parallel, train
from mmjax.config_validation import ConfigError
from test_train import ToyTask, one_device_mesh, toy_config


def test_decay_warms_up_then_settles():
    d = [float(ema.decay_at(t, 0.999)) for t in (0, 1, 8, 10_000)]
    assert d[0] == pytest.approx(1 / 10) and d[1] == pytest.approx(2 / 11)
    assert d[2] == pytest.approx(9 / 18)
    assert d[3] == pytest.approx(0.999)


def test_update_is_the_moving_average_of_a_param_sequence():
    rng = np.random.default_rng(0)
    seq = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(6)]
    got, want = {"w": seq[0]}, seq[0].astype(np.float64)
    for t, p in enumerate(seq[1:]):
        got = ema.update(got, {"w": p}, t, 0.5)
        d = min(0.5, (1 + t) / (10 + t))
        want = d * want + (1 - d) * p
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-6)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_trainer_keeps_the_average_without_changing_training(tmp_path):
    plain = train.train(toy_config(steps=6), str(tmp_path / "plain"),
                        ToyTask().build(toy_config(steps=6)), mesh=one_device_mesh())
    cfg = toy_config(steps=6, ema_decay=0.9)
    kept = train.train(cfg, str(tmp_path / "ema"), ToyTask().build(cfg), mesh=one_device_mesh())
    for a, b in zip(_leaves(plain["state"]["params"]), _leaves(kept["state"]["params"])):
        np.testing.assert_array_equal(a, b)  # the average never feeds back into the steps
    assert ema.STATE_KEY not in plain["state"]
    averaged = _leaves(kept["state"][ema.STATE_KEY])
    assert any(not np.array_equal(a, b) for a, b in
               zip(averaged, _leaves(kept["state"]["params"])))
    assert "val_ema_mse" in kept["validation"] and "val_mse" in kept["validation"]


def test_average_matches_a_replay_of_the_steps():
    cfg = toy_config(steps=6, ema_decay=0.9)
    task, mesh, rules = ToyTask().build(cfg), one_device_mesh(), parallel.logical_rules()
    ds = task.dataset("train", train=True)
    batches = [{k: np.stack([ds[8 * b + i][k] for i in range(8)]) for k in ("x", "y")}
               for b in range(6)]
    setup = train.build_setup(task, batches[0], mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = setup.init_fn(jax.random.PRNGKey(0))
        want = [a.astype(np.float64) for a in _leaves(state["params"])]
        np.testing.assert_array_equal(_leaves(state[ema.STATE_KEY])[0], want[0])
        for t, batch in enumerate(batches):
            state, _ = setup.train_step(state, parallel.shard_batch(batch, mesh))
            d = min(0.9, (1 + t) / (10 + t))
            want = [d * w + (1 - d) * p for w, p in zip(want, _leaves(state["params"]))]
    for a, b in zip(_leaves(state[ema.STATE_KEY]), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resume_is_bitwise_with_the_average(tmp_path):
    cfg = toy_config(steps=12, ema_decay=0.8)
    full = train.train(cfg, str(tmp_path / "a"), ToyTask().build(cfg), mesh=one_device_mesh())
    train.train(cfg, str(tmp_path / "b"), ToyTask().build(cfg), mesh=one_device_mesh(),
                stop_at_step=6)
    second = train.train(cfg, str(tmp_path / "b"), ToyTask().build(cfg), mesh=one_device_mesh())
    for a, b in zip(_leaves(full["state"][ema.STATE_KEY]), _leaves(second["state"][ema.STATE_KEY])):
        np.testing.assert_array_equal(a, b)


def test_which_weights_sampling_reads():
    assert ema.params_key(0.0) == "params" and ema.params_key(0.999) == ema.STATE_KEY
    assert ema.params_key(0.999, "raw") == "params"
    assert ema.params_key(0.999, "ema") == ema.STATE_KEY
    config = config_defaults.base_config()
    assert ema.model_params_key(config) == "params"  # default: no average kept
    config.train.ema_decay = 0.999
    assert ema.model_params_key(config) == ema.STATE_KEY


@pytest.mark.parametrize("field,value,needle", [
    ("train.ema_decay", 1.0, "config.train.ema_decay=1.0"),
    ("train.ema_decay", -0.1, "config.train.ema_decay=-0.1"),
    ("sample.weights", "best", "config.sample.weights='best'"),
    ("sample.weights", "ema", "sample.weights='ema' needs train.ema_decay > 0"),
])
def test_bad_ema_settings_name_the_field(field, value, needle):
    config = config_defaults.base_config()
    block, key = field.split(".")
    config[block][key] = value
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_validation.validate(config)
