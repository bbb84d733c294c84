"""The generic trainer on a toy regression task: learning, resume == uninterrupted, NaN policy,
gradient accumulation, sharded == unsharded, and clear errors."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from mmjax import checkpointing, config_defaults, parallel, train
from mmjax.metrics_writer import read_jsonl


class ToyModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")), use_bias=False)(x)
        h = nn.tanh(h)
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", None)), use_bias=False)(h)[..., 0]


class ToyTask:
    """y = <w, x> + noise; a record at `nan_index` carries inf to poison one step.

    `ToyTask(nan_index)` describes the task; `.build(config)` binds it to a run's config, as the
    trainer's Task protocol wants (tasks are built once with what they need).
    """

    name = "toy"

    def __init__(self, nan_index=None, config=None):
        self.nan_index = nan_index
        self.train_config = None if config is None else config.train

    def build(self, config):
        return type(self)(self.nan_index, config)

    def dataset(self, split, *, train):
        w = np.linspace(-1, 1, 8).astype(np.float32)
        offset = 0 if split == "train" else 10_000

        def make(i):
            rng = np.random.default_rng(i + offset)
            x = rng.normal(size=8).astype(np.float32)
            y = np.float32(x @ w + 0.01 * rng.normal())
            if self.nan_index is not None and i == self.nan_index:
                y = np.float32(np.inf)
            return {"x": x, "y": y}

        return grain.MapDataset.range(64).map(make)

    def init_params(self, rng, batch):
        return ToyModel().init(rng, batch["x"])["params"]

    def loss_fn(self, params, batch, rng, train):
        pred = ToyModel().apply({"params": params}, batch["x"])
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mse": loss}


def toy_config(steps=12, **train_overrides):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = config_defaults.data_config()
    c.mesh = config_defaults.mesh_config()
    c.train = config_defaults.train_config()
    c.train.update(dict(steps=steps, batch_size=8, lr=3e-2, warmup_steps=2, log_every=1,
                        checkpoint_every=4, eval_batches=2, progress_bar=False))
    c.train.update(train_overrides)
    return c


def losses(workdir):
    return [r["loss"] for r in read_jsonl(os.path.join(workdir, "toy", "train_metrics.jsonl"))
            if "loss" in r]


def one_device_mesh():
    return parallel.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                devices=jax.devices()[:1])


def test_loss_drops_and_resume_is_bitwise_identical(tmp_path):
    full = train.train(toy_config(), str(tmp_path / "a"), ToyTask().build(toy_config()), mesh=one_device_mesh())
    first = train.train(toy_config(), str(tmp_path / "b"), ToyTask().build(toy_config()), mesh=one_device_mesh(),
                        stop_at_step=6)
    assert first["preempted"] and first["step"] == 6
    second = train.train(toy_config(), str(tmp_path / "b"), ToyTask().build(toy_config()), mesh=one_device_mesh())
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 12 and len(b) == 12
    assert a == b, "resumed run must see the same data and produce the same losses"
    assert a[-1] < 0.5 * a[0]
    for x, y in zip(jax.tree.leaves(full["state"]["params"]),
                    jax.tree.leaves(second["state"]["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert "val_mse" in full["validation"]


def test_sharded_equals_unsharded(tmp_path):
    ref = losses_of(tmp_path / "ref", one_device_mesh())
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]:
        mesh = parallel.create_mesh(ml_collections.ConfigDict(
            dict(data=shape[0], fsdp=shape[1], tensor=shape[2])))
        got = losses_of(tmp_path / "x".join(map(str, shape)), mesh)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6, err_msg=str(shape))


def losses_of(workdir, mesh):
    train.train(toy_config(steps=5), str(workdir), ToyTask().build(toy_config(steps=5)), mesh=mesh)
    return losses(workdir)


def test_grad_accum_matches_full_batch(tmp_path):
    losses_of(tmp_path / "one", one_device_mesh())
    train.train(toy_config(steps=5, grad_accum=2), str(tmp_path / "two"), ToyTask().build(toy_config(steps=5, grad_accum=2)),
                mesh=one_device_mesh())
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def test_nan_stops_with_step_and_writes_no_poisoned_checkpoint(tmp_path):
    # Without shuffling knowledge we poison every record's batch partner: index 0 is in some batch.
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match=r"at step \d+"):
        train.train(toy_config(steps=20), workdir, ToyTask(nan_index=0).build(toy_config(steps=20)), mesh=one_device_mesh())
    manager = checkpointing.make_manager(f"{workdir}/toy/checkpoints", 3, read_only=True)
    for step in manager.all_steps():
        _, state = checkpointing.restore_params(f"{workdir}/toy/checkpoints")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_nan_skip_policy_finishes_with_finite_params(tmp_path):
    out = train.train(toy_config(steps=12, nan_policy="skip"), str(tmp_path), ToyTask(nan_index=0).build(toy_config(steps=12, nan_policy="skip")),
                      mesh=one_device_mesh())
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["state"]["params"]))
    rows = read_jsonl(os.path.join(tmp_path, "toy", "train_metrics.jsonl"))
    assert any(r.get("finite") == 0.0 for r in rows), "the poisoned step must be reported"


def test_bad_batch_size_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size"):
        train.train(toy_config(batch_size=6), str(tmp_path), ToyTask().build(toy_config(batch_size=6)),
                    mesh=parallel.create_mesh(ml_collections.ConfigDict(
                        dict(data=4, fsdp=2, tensor=1))))


def test_bad_mesh_names_the_field():
    with pytest.raises(ValueError, match="mesh.data"):
        parallel.create_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=1)))
    with pytest.raises(ValueError, match=r"mesh\.fsdp=-1"):
        parallel.create_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=-1, tensor=1)))


def test_config_stored_as_json_beside_checkpoint(tmp_path):
    train.train(toy_config(steps=4), str(tmp_path), ToyTask().build(toy_config(steps=4)), mesh=one_device_mesh())
    stored = checkpointing.restore_config(f"{tmp_path}/toy/checkpoints")
    assert stored["train"]["steps"] == 4
    json.dumps(stored)


def test_config_changes_are_listed():
    old = {"train": {"steps": 4, "lr": 0.1}, "seed": 0}
    new = {"train": {"steps": 8, "lr": 0.1}, "seed": 0, "extra": 1}
    assert train.config_changes(old, new) == ["extra: '<absent>' -> 1", "train.steps: 4 -> 8"]
    assert train.config_changes(old, old) == []


def test_weight_decay_skips_norm_scales_and_biases():
    """Decay applies to weight matrices by name: a per-modality norm scale [M, D] is rank 2 but
    must not shrink, and a bias never does."""
    params = {"block": {"norm": {"scale": jnp.ones((2, 4))}, "dense": {"kernel": jnp.ones((4, 4)),
                                                                      "bias": jnp.ones(4)}},
              "embed": {"embedding": jnp.ones((8, 4))}}
    mask = train.decay_mask(params)
    assert mask == {"block": {"norm": {"scale": False}, "dense": {"kernel": True, "bias": False}},
                    "embed": {"embedding": True}}
    tc = toy_config().train
    tc.update(weight_decay=0.5, lr=0.1, warmup_steps=0, grad_clip=0.0)
    tx = train.make_optimizer(tc)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == mask  # with zero gradients only decayed leaves change


def test_profile_window_writes_a_trace_and_logs_throughput(tmp_path):
    """train.profile_steps=(2, 4) writes a jax.profiler trace (xplane) under <run>/profile, and
    every logged row carries steps/s and examples/s (the toy task counts no tokens)."""
    config = toy_config(steps=5, profile_steps=(2, 4))
    train.train(config, str(tmp_path), ToyTask().build(config), mesh=one_device_mesh())
    traces = list((tmp_path / "toy" / "profile").rglob("*.xplane.pb"))
    assert traces, list((tmp_path / "toy").rglob("*"))
    rows = [r for r in read_jsonl(os.path.join(tmp_path, "toy", "train_metrics.jsonl"))
            if "loss" in r]
    assert rows and all(r["steps_per_sec"] > 0 and r["examples_per_sec"] > 0 for r in rows)
    assert (tmp_path / "toy" / "config.json").exists()
