"""The one training loop: tokenizer and multimodal model are both `Task`s plugged into it.

Why one loop: checkpointing, resumption (with the data iterator's position), sharding, metrics,
NaN handling and preemption are the hard parts; they are written once. A task only says how to
build its data, initialise its parameters and compute its loss (see docs/INTERFACES.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from mmjax import checkpointing, ema, io, parallel, progress
from mmjax.preemption import PreemptionWatch
from mmjax.data.pipeline import batched_iterator
from mmjax.errors import InputError
from mmjax.metrics_writer import MetricsWriter
from mmjax.workdir import Workdir


class Task(Protocol):
    """What the trainer needs from a (model, data) pair, built once with everything it needs
    (its config block, data paths, vocabulary); the stage that builds it has already checked that
    its inputs exist. See docs/INTERFACES.md."""

    name: str  # the run's directory under the workdir ("tokenizer", "model")
    train_config: ml_collections.ConfigDict  # the optimisation block (train / tokenizer_train)

    def dataset(self, split: str, *, train: bool): ...
    def init_params(self, rng, batch) -> Any: ...
    def loss_fn(self, params, batch, rng, train: bool) -> tuple[jax.Array, dict]: ...
    # Optional, for tasks with non-trained variables (e.g. an EMA VQ codebook):
    #   init_model_state(rng, batch) -> pytree, or None for none; when not None the trainer
    #   keeps it in state["model_state"] (replicated, checkpointed) and calls
    #   loss_fn_with_state(params, model_state, batch, rng, train)
    #       -> (loss, (metrics, new_model_state)) instead of loss_fn.


def init_model_state(task, rng, batch):
    """The task's non-param state, or None (tasks without `init_model_state` have none)."""
    init = getattr(task, "init_model_state", None)
    return None if init is None else init(rng, batch)


def task_loss(task, params, model_state, batch, rng, train: bool):
    """(loss, (metrics, new model state)) whether or not the task has model state."""
    if model_state is None:
        loss, metrics = task.loss_fn(params, batch, rng, train)
        return loss, (metrics, None)
    return task.loss_fn_with_state(params, model_state, batch, rng, train)


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss or gradients became NaN/inf and nan_policy is 'stop'."""


class Preempted(RuntimeError):
    """A stage's training stopped early on SIGTERM (its checkpoint is saved; rerun to resume).

    Raised by `stages`, so a pipeline never evaluates or builds on a half-trained stage, and the
    CLI exits 143 (terminated) so schedulers requeue rather than count the job as done.
    """


def make_schedule(tc) -> optax.Schedule:
    """Linear warmup then cosine decay to lr * end_lr_ratio."""
    warmup = min(int(tc.warmup_steps), max(int(tc.steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warmup,
        decay_steps=max(int(tc.steps), warmup + 1), end_value=tc.lr * tc.end_lr_ratio)


DECAYED_PARAMS = ("kernel", "embedding")  # weight matrices; never norm scales or biases


def decay_mask(params) -> Any:
    """True for the leaves weight decay applies to: weight matrices by name, not by rank.

    Why names: per-modality RMSNorm scales are [modalities, d_model] (rank 2), and decaying
    them pulls every norm towards zero (about 40% shrink pressure over a 100k-step run).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED_PARAMS, params)


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW (decay on weight matrices only, see `decay_mask`) behind global-norm clipping."""
    adamw = optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw


@dataclasses.dataclass
class Setup:
    """Everything `train` derives once from the config: mesh, shardings, jitted functions."""

    mesh: jax.sharding.Mesh
    rules: tuple
    state_shardings: Any
    abstract_state: Any
    init_fn: Callable
    train_step: Callable
    eval_step: Callable


def _state_shardings(task, tx, example, mesh, rules):
    """Shardings of {params, opt_state, step, rng} from the params' logical axis names."""
    rng = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(lambda r: task.init_params(r, example), rng)
    logical = nn.get_partition_spec(boxed)
    param_sh = parallel.logical_to_sharding(logical, mesh, rules)
    abstract_params = nn.unbox(boxed)
    parallel.check_divisible(
        (abstract_params, jax.tree.map(lambda s: s.spec, param_sh)), mesh, "params")
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = parallel.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: repl)
    shardings = {"params": param_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
    abstract = {"params": abstract_params, "opt_state": abstract_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32),
                "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
    abstract_ms = jax.eval_shape(lambda r: init_model_state(task, r, example), rng)
    if abstract_ms is not None:  # only then is there a "model_state" entry (old checkpoints match)
        shardings["model_state"] = jax.tree.map(lambda _: repl, abstract_ms)
        abstract["model_state"] = abstract_ms
    if ema.decay_of(task.train_config) > 0:  # the average lives beside the params, sharded alike
        shardings[ema.STATE_KEY] = param_sh
        abstract[ema.STATE_KEY] = abstract_params
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return shardings, abstract


def _grads(task, params, model_state, batch, rng, grad_accum: int):
    """Loss, metrics and gradients, averaged over `grad_accum` microbatches (lax.scan), and the
    model state after them (threaded through the microbatches in order; None without one)."""
    loss_fn = lambda p, ms, b, r: task_loss(task, p, ms, b, r, True)  # noqa: E731
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch, rng)
        return loss, metrics, grads, model_state
    # [B, ...] -> [A, B/A, ...] taking every A-th example so each microbatch stays spread over
    # the batch-sharded devices.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1),
                         batch)

    def body(carry, xs):
        acc, ms = carry
        mb, i = xs
        (loss, (metrics, ms)), grads = grad_fn(params, ms, mb, jax.random.fold_in(rng, i))
        acc = jax.tree.map(jnp.add, acc, (loss, metrics, grads))
        return (acc, ms), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: grad_fn(params, model_state, jax.tree.map(lambda x: x[0], micro), rng)))
    zeros = (zeros[0][0], zeros[0][1][0], zeros[1])
    (total, model_state), _ = jax.lax.scan(body, (zeros, model_state),
                                           (micro, jnp.arange(grad_accum)))
    loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, total)
    return loss, metrics, grads, model_state


def build_setup(task, example, mesh, rules) -> Setup:
    """Jits init / train step / eval step with shardings derived from the rules table."""
    tc = task.train_config
    tx = make_optimizer(tc)
    schedule = make_schedule(tc)
    ema_decay = ema.decay_of(tc)
    shardings, abstract = _state_shardings(task, tx, example, mesh, rules)
    batch_sh = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}
    repl = parallel.replicated(mesh)

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = nn.unbox(task.init_params(init_rng, example))
        state = {"params": params, "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": state_rng}
        model_state = init_model_state(task, init_rng, example)
        if model_state is not None:
            state["model_state"] = model_state
        if ema_decay > 0:
            state[ema.STATE_KEY] = jax.tree.map(jnp.copy, params)
        return state

    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss, metrics, grads, model_state = _grads(task, state["params"],
                                                   state.get("model_state"), batch, rng,
                                                   tc.grad_accum)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step never reaches the params (or a checkpoint); nan_policy only decides
        # whether the host then stops the run or carries on.
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": state["rng"]}
        if model_state is not None:
            new_state["model_state"] = keep(model_state, state["model_state"])
        if ema_decay > 0:  # a skipped (non-finite) step leaves params as they were: so does this
            new_state[ema.STATE_KEY] = keep(
                ema.update(state[ema.STATE_KEY], params, state["step"], ema_decay),
                state[ema.STATE_KEY])
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    def eval_step(params, batch, model_state=None):
        _, (metrics, _) = task_loss(task, params, model_state, batch, jax.random.PRNGKey(0),
                                    False)
        return metrics

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init_fn = jax.jit(init, out_shardings=shardings)
        train_step = jax.jit(step, in_shardings=(shardings, batch_sh),
                             out_shardings=(shardings, repl), donate_argnums=0)
        eval_jit = jax.jit(eval_step, in_shardings=(shardings["params"], batch_sh,
                                                    shardings.get("model_state")),
                           out_shardings=repl)
        eval_fn = lambda params, batch, model_state=None: eval_jit(  # noqa: E731
            params, batch, model_state)
    return Setup(mesh, rules, shardings, abstract, init_fn, train_step, eval_fn)


def _check_batch(tc, mesh) -> int:
    """Per-process batch size, or a clear error naming train.batch_size / train.grad_accum."""
    bs, procs, accum = int(tc.batch_size), jax.process_count(), int(tc.grad_accum)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if bs <= 0 or accum <= 0:
        raise InputError(f"train.batch_size={bs} and train.grad_accum={accum} must be positive.")
    if bs % (shards * accum) or bs % procs:
        raise InputError(
            f"train.batch_size={bs} must be divisible by mesh.data*mesh.fsdp*train.grad_accum = "
            f"{shards}*{accum} and by the {procs} processes.")
    return bs // procs


def evaluate_loss(setup: Setup, params, iterator, num_batches: int,
                  model_state=None) -> dict[str, float]:
    """Mean of the task's metrics over `num_batches` validation batches."""
    sums: dict[str, float] = {}
    count = 0
    for batch in iterator:
        if count >= num_batches:
            break
        metrics = jax.device_get(setup.eval_step(params, parallel.shard_batch(batch, setup.mesh),
                                                 model_state))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


def train(config, workdir, task: Task, *, mesh=None, stop_at_step: int | None = None,
          observe=None) -> dict:
    """Trains `task` to `train.steps`, resuming from the workdir's <task.name>/checkpoints.

    `workdir`: a mmjax.workdir.Workdir or a path. From `config` the trainer reads only the mesh,
    the seeds and (to store beside each checkpoint) the whole config as JSON. `stop_at_step` ends
    this invocation early after checkpointing, as a preemption would (used by resumption tests).
    `observe(params, step)`, if given, runs every train.eval_every steps and returns a report for
    MetricsWriter.write_report (sample grids, captions, accuracies). Returns a summary dict (final step, last metrics, validation metrics).
    """
    wd = workdir if isinstance(workdir, Workdir) else Workdir.from_config(config, workdir)
    tc = task.train_config
    mesh = mesh or parallel.create_mesh(config.mesh)
    logging.info("%s: mesh %s over %d %s device(s)", task.name, dict(mesh.shape), mesh.size,
                 mesh.devices.flat[0].platform)
    rules = parallel.logical_rules()
    run_dir = wd.run_dir(task.name)
    local_bs = _check_batch(tc, mesh)
    pid, nproc = jax.process_index(), jax.process_count()
    train_ds = task.dataset("train", train=True)
    iterator = iter(batched_iterator(train_ds, int(tc.batch_size), seed=config.data.shuffle_seed,
                                     shuffle=True, shuffle_block=_group_rows(train_ds),
                                     process_index=pid, process_count=nproc,
                                     worker_count=int(config.data.worker_count),
                                     read_threads=int(config.data.read_threads)))
    example = _local_example(train_ds, local_bs)
    setup = build_setup(task, example, mesh, rules)
    checkpoints = wd.checkpoints(task.name)
    manager = checkpointing.make_manager(str(checkpoints), tc.keep_checkpoints)
    start, state = checkpointing.restore_latest(manager, setup.abstract_state, iterator)
    if state is None:
        state = setup.init_fn(jax.random.PRNGKey(config.seed))
        start = 0
    else:
        logging.info("resumed %s from step %d", task.name, start)
        _warn_config_changes(str(checkpoints), _config_json(config))
    run = _Run(task, setup, iterator, manager, MetricsWriter(run_dir), _config_json(config),
               stop_at_step, observe)
    if jax.process_index() == 0:  # the resolved config, for people and for scripts
        logging.info("%s config:\n%s", task.name, config.to_json_best_effort(indent=2))
        io.write_json_atomic(run_dir / "config.json", run.config_json)
        run.writer.write_text(start, "config", "```\n" + json.dumps(run.config_json, indent=2)
                              + "\n```")
    try:
        summary = _loop(run, state, start)
    except BaseException:  # NaN, Ctrl-C, full disk: a good checkpoint still in flight lands
        _finish_saves_quietly(manager)
        raise
    finally:  # flush metrics even when the run fails, but keep the run's error
        try:
            run.writer.close()
        except OSError as e:
            logging.warning("could not flush metrics to %s: %s", run_dir, e)
    checkpointing.wait_until_finished(manager)
    manager.close()
    return summary


@dataclasses.dataclass
class _Run:
    """What one invocation of the loop works with (built once by `train`)."""

    task: Task
    setup: Setup
    iterator: Any
    manager: Any
    writer: MetricsWriter
    config_json: dict
    stop_at_step: int | None
    observe: Callable | None = None


def _finish_saves_quietly(manager) -> None:
    """Waits for asynchronous saves while another error is on its way out (which must win)."""
    try:
        checkpointing.wait_until_finished(manager)
        manager.close()
    except Exception as e:  # noqa: BLE001
        logging.warning("pending checkpoint save failed too: %s", e)


def _group_rows(ds) -> int:
    """Rows the task's dataset groups (the multimodal packer's direction groups, which batches
    must keep whole); 1 for datasets without groups (the tokenizer's images)."""
    return int(getattr(ds, "group_rows", 1))


def _local_example(ds, local_bs: int) -> dict:
    """A batch used only for shapes (param init, shardings); does not touch the train iterator."""
    batch = next(iter(batched_iterator(ds, local_bs, seed=0, shuffle=False)))
    return {k: v for k, v in batch.items() if np.asarray(v).dtype != object}


def _loop(run: _Run, state, start: int) -> dict:
    task, setup, tc = run.task, run.setup, run.task.train_config
    last_metrics: dict[str, float] = {}
    total = int(tc.steps)
    watch = progress.Watch(task, tc, start, run.writer.run_dir)
    step = start
    unchecked = []  # (step, device metrics) of steps whose finiteness the host has not seen yet
    try:
        # Multi-process: every process stops at the same step (see mmjax.preemption).
        with PreemptionWatch(check_every=tc.log_every) as preempt, jax.set_mesh(setup.mesh), \
                nn.logical_axis_rules(setup.rules):
            while step < total:
                host_batch = next(run.iterator)
                watch.count(host_batch)
                watch.before_step(step)
                state, metrics = setup.train_step(state,
                                                  parallel.shard_batch(host_batch, setup.mesh))
                step += 1
                unchecked.append((step, {k: metrics[k] for k in ("finite", "loss", "grad_norm")}))
                preempted = preempt.should_stop(step)  # every step: a collective protocol
                stopping = preempted or step == run.stop_at_step or step == total
                due_ckpt = step % tc.checkpoint_every == 0 or stopping
                if step % tc.log_every == 0 or due_ckpt:
                    _check_finite(unchecked, tc)
                    unchecked = []
                    last_metrics = {**_host_metrics(metrics), **watch.rates(step)}
                    run.writer.write(step, last_metrics)
                    watch.log_line(step, last_metrics)
                if tc.eval_every and step % tc.eval_every == 0 and step != total:
                    run.writer.write(step, _validation(task, setup, state))
                    _periodic(run, state, step)
                if due_ckpt:
                    checkpointing.save(run.manager, step, state, run.iterator, run.config_json)
                watch.after_step(step, last_metrics)
                if stopping and step != total:
                    logging.warning("%s stopped at step %d (checkpoint saved)", task.name, step)
                    return {"step": step, "train": last_metrics, "preempted": True}
            watch.close()
            # Inside the mesh context, like the periodic evals: eval_step then compiles once.
            val = _validation(task, setup, state)
            run.writer.write(step, val)
    finally:
        watch.close()
    return {"step": step, "train": last_metrics, "validation": val, "preempted": False,
            "state": state}


def _periodic(run: _Run, state, step: int) -> None:
    """The stage's look at the model every train.eval_every steps (samples, grids, rule checker:
    `observe(params, step) -> report`), written to TensorBoard as images, text and scalars."""
    if run.observe is None:
        return
    report = run.observe(state.get(ema.STATE_KEY, state["params"]), step)
    if jax.process_index() == 0 and report:
        run.writer.write_report(step, report)


def _check_finite(unchecked, tc) -> None:
    """Under nan_policy='stop' a non-finite step ends the run, whether or not it was logged.

    Every step since the last check is looked at (one device_get of a few scalars per step), so
    log_every > 1 cannot hide a skipped update.
    """
    for step, m in jax.device_get(unchecked):
        loss = float(m["loss"])
        if float(m["finite"]) >= 1.0 and math.isfinite(loss):
            continue
        if tc.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss={loss}, "
                f"grad_norm={float(m['grad_norm'])}); the update was not applied and no "
                "checkpoint was written. Set train.nan_policy='skip' to skip such steps.")
        logging.warning("step %d: non-finite loss/gradient, update skipped", step)


def _host_metrics(metrics) -> dict[str, float]:
    """Pulls metrics to the host (their finiteness was checked by `_check_finite`)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _validation(task, setup, state) -> dict[str, float]:
    tc = task.train_config
    ds = task.dataset("validation", train=False)
    out = {}
    for key, prefix in (("params", "val_"), (ema.STATE_KEY, "val_ema_")):
        if key in state:  # the EMA's losses beside the last iterate's, from the same batches
            it = batched_iterator(ds, int(tc.batch_size), seed=0, shuffle=False, num_epochs=1,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
            metrics = evaluate_loss(setup, state[key], iter(it), int(tc.eval_batches),
                                    state.get("model_state"))
            out.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return out


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """Fields whose value differs between two config JSONs ("a.b: old -> new")."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _warn_config_changes(checkpoint_dir: str, current: dict) -> None:
    """A resumed run with a different config is allowed (e.g. more steps) but never silent."""
    try:
        stored = checkpointing.restore_config(checkpoint_dir)
    except Exception:  # noqa: BLE001 - an old checkpoint without a config: nothing to compare
        return
    changes = config_changes(stored, current)
    if changes:
        logging.warning("resuming with a config that differs from the checkpoint's: %s",
                        "; ".join(changes))


def _config_json(config) -> dict:
    """The config as plain JSON (stored beside each checkpoint; never pickled)."""
    return json.loads(config.to_json_best_effort())
