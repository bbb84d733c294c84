"""Numerics of the real MultimodalLM under the trainer: bf16 compute trains with float32 params and
optimizer state; activation checkpointing ("full", "dots") changes neither loss nor gradients;
gradient accumulation over 2 microbatches equals the full batch.

Uses the synthetic packed-row task of test_parallel.py. Params are initialised with an
`unsafe_rbg` key, whose init compiles much faster than threefry's on CPU; nothing here depends on
which generator drew the initial weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax import train
from test_parallel import SyntheticTask, example_batch, make_mesh, run_steps, setup_for, \
    tiny_config, train_batches


@pytest.fixture(scope="module")
def init_params():
    """Initial params of the tiny model (host copy), shared by every test here."""
    config, task = tiny_config(), SyntheticTask()
    batch = example_batch(config, task)
    params = jax.jit(lambda k: nn.unbox(task.build(config).init_params(k, batch)))(
        jax.random.key(0, impl="unsafe_rbg"))
    return jax.device_get(params)


def initial_state(config, params, setup):
    """A fresh train state, as setup.init_fn would make it, placed with the setup's shardings."""
    state = {"params": params, "opt_state": train.make_optimizer(config.train).init(params),
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(1)}
    return jax.device_put(state, setup.state_shardings)


def one_device():
    return make_mesh((1, 1, 1), jax.devices()[:1])


def test_bf16_compute_trains_with_float32_state(init_params):
    config, task = tiny_config(steps=6, model=dict(dtype="bfloat16"), lr=1e-2), SyntheticTask()
    setup = setup_for(config, task, one_device())
    # The compute really is bf16: the backbone's hidden states come out in bfloat16.
    batch = example_batch(config, task)
    hidden = jax.eval_shape(lambda p: task.model(config).apply({"params": p}, batch),
                            setup.abstract_state["params"])
    assert hidden.dtype == jnp.bfloat16
    state = initial_state(config, init_params, setup)
    batches = train_batches(config, task, 3)
    state, losses = run_steps(setup, state, batches + batches)
    print("bf16 losses", np.round(losses, 3))
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.2, losses
    for part in ("params", "opt_state"):
        floats = [x for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats), part
        abstract = jax.tree.leaves(setup.abstract_state[part])
        assert all(x.dtype == jnp.float32 for x in abstract
                   if jnp.issubdtype(x.dtype, jnp.floating)), part


def loss_and_grads(config, task, params, batch):
    fn = jax.value_and_grad(lambda p: task.build(config).loss_fn(
        p, batch, jax.random.PRNGKey(3), True)[0])
    return jax.jit(fn)(params)


def test_remat_full_and_dots_match_no_remat(init_params):
    task = SyntheticTask()
    batch = {k: jnp.asarray(v) for k, v in example_batch(tiny_config(), task).items()}
    # Perturb the zero-initialised flow-head gates/outputs so every gradient path is non-trivial.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32),
                          init_params)
    ref_loss, ref_grads = loss_and_grads(tiny_config(), task, params, batch)
    assert np.isfinite(float(ref_loss))
    for mode in ("full", "dots"):
        loss, grads = loss_and_grads(tiny_config(model=dict(remat=mode)), task, params, batch)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=mode)
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{mode} {jax.tree_util.keystr(path)}")


def test_grad_accum_2_matches_full_batch(init_params):
    """Text loss only (image_weight 0): the flow term's (t, noise) draws depend on the
    microbatch index by design, so only the deterministic part can match exactly. Rows share one
    layout, so per-microbatch masked means average to the full-batch mean."""
    task = SyntheticTask(fixed_layout=True)
    runs = {}
    for accum in (1, 2):
        config = tiny_config(grad_accum=accum)
        config.objective.image_weight = 0.0
        setup = setup_for(config, task, one_device())
        state, losses = run_steps(setup, initial_state(config, init_params, setup),
                                  train_batches(config, task, 3))
        runs[accum] = (losses, jax.device_get(state["params"]))
    assert runs[1][0][-1] < runs[1][0][0]
    np.testing.assert_allclose(runs[2][0], runs[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs[2][1]), jax.tree.leaves(runs[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
