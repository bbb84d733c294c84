"""Orbax checkpoints of the train state *and* the grain iterator state.

Why both: resuming must reproduce an uninterrupted run exactly, so the data position is part of
the checkpoint, not re-derived from the step. Why a wrapper: a corrupt latest checkpoint (a host
died mid-write, a disk filled) must fall back to the previous one with a warning, and an existing
step must never be overwritten. Nothing here uses pickle: orbax writes arrays (OCDBT/zarr) and
grain writes its iterator state as JSON.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax import cloud
from mmjax.errors import InputError, MissingArtifactError, StorageError

STATE, DATA, CONFIG = "state", "data", "config"


def check_writable(directory: epath.Path) -> None:
    """Creates `directory` and writes and deletes a probe file in it, or raises one clear line.
    Every process of a multi-host job probes the shared directory at once, so each probe has
    its own name (cloud.write_probe)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = epath.Path(cloud.write_probe(str(directory)))
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"checkpoint directory {directory} is not writable: {e}") from e


def make_manager(directory: str, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager for <directory>; fails clearly when the directory cannot be written."""
    path = epath.Path(directory)
    if not read_only:
        check_writable(path)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True,
        # The save's directories are made before save() returns; only the writes run in the
        # background. Made asynchronously, the caller waits for a "directories created" signal
        # keyed by orbax's process-wide operation id, and once in a CI run (orbax 0.12.8) that
        # signal never came: the save hung for the 300 s timeout and failed. A mkdir per save
        # costs the loop milliseconds.
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
    return ocp.CheckpointManager(
        path, options=options,
        # Read-only managers read the state with the PyTree handler, which can restore a subset
        # (just the params) of what StandardSave wrote.
        item_handlers={STATE: ocp.PyTreeCheckpointHandler() if read_only
                       else ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator=None,
         config_json: dict | None = None) -> None:
    """Saves step `step` unless it already exists (never overwrites)."""
    if step in manager.all_steps():
        logging.info("checkpoint for step %d already exists; not overwriting it", step)
        return
    items = {STATE: ocp.args.StandardSave(state)}
    if iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(iterator)
    if config_json is not None:
        items[CONFIG] = ocp.args.JsonSave(config_json)
    try:  # also raises a failure of the previous (asynchronous) save
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise _write_error(manager, e) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for pending asynchronous saves; a failed background write becomes one clear error."""
    try:
        manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
        raise _write_error(manager, e) from e


class CheckpointWriteError(StorageError):
    """A checkpoint could not be written (disk full, permissions, a vanished mount)."""


def _write_error(manager, error: Exception) -> CheckpointWriteError:
    # Orbax/tensorstore report a full disk as e.g. ValueError("RESOURCE_EXHAUSTED: ...") from a
    # background thread; name the directory and say what a rerun does.
    return CheckpointWriteError(
        f"writing a checkpoint to {manager.directory} failed ({type(error).__name__}: {error}); "
        "free space or fix permissions there and rerun: training resumes from the newest "
        "complete checkpoint")


class CheckpointRestoreError(StorageError):
    """Checkpoints exist but none can be restored (corrupt, or written with another config)."""


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, iterator=None):
    """Restores the newest readable checkpoint; returns (step, state) or (None, None) if none exist.

    A checkpoint that fails to load is skipped with a warning and the previous one is tried, so a
    corrupt last write costs a few steps, not the run. The skipped newer steps are then deleted:
    the resumed run recomputes them and must be able to save them again (`save` never overwrites).
    When checkpoints exist but none loads, this raises instead of silently starting from scratch
    (most often the config changed the model's shapes and the workdir belongs to another run).
    """
    unreadable, last_error = [], None
    for step in sorted(manager.all_steps(), reverse=True):
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
            logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the "
                            "previous one", step, manager.directory, type(e).__name__, e)
            unreadable.append(step)
            last_error = e
            continue
        for bad in unreadable:
            logging.warning("deleting unreadable checkpoint %d in %s (it will be recomputed)",
                            bad, manager.directory)
            manager.delete(bad)
        return step, restored[STATE]
    if unreadable:
        raise CheckpointRestoreError(
            f"{manager.directory} has checkpoints at steps {sorted(unreadable)} but none can be "
            f"restored (oldest: {type(last_error).__name__}: {last_error}). If the config changed "
            "the model, use a new --workdir; if they are corrupt, move them away to start over")
    return None, None


def require_directory(directory) -> None:
    """MissingArtifactError naming `directory` when a stage's checkpoints were never written."""
    if not epath.Path(directory).is_dir():
        raise MissingArtifactError(f"no checkpoint directory at {directory}; train that stage "
                                   "first (--mode=tokenizer / --mode=model, or --mode=pipeline)")


def restore_params(directory: str, abstract_params: Any, step: int | None = None,
                   key: str = "params") -> tuple[int, Any]:
    """(step, params) of the newest readable checkpoint in a run's dir (for sampling/evals), or
    of checkpoint `step` when given (an error naming the steps there when it is absent). `key` is
    the train-state entry to read: "params", or "ema_params" for the run's average (mmjax.ema).

    Only the params are read (not the optimizer state), placed as `abstract_params` says
    (ShapeDtypeStructs, optionally with shardings: a different mesh than training is fine).
    """
    step, items = restore_state_items(directory, {key: abstract_params}, step)
    return step, items[key]


def restore_state_items(directory: str, abstract_items: dict,
                        step: int | None = None) -> tuple[int, dict]:
    """(step, {key: tree}) for some top-level entries of the train state, e.g. params and
    model_state (a tokenizer with an EMA codebook), from the newest readable checkpoint (or
    checkpoint `step`)."""
    require_directory(directory)
    manager = make_manager(directory, keep=1, read_only=True)
    steps = _pick_steps(manager, directory, step)
    for step in steps:
        try:
            target = jax.tree.map(_with_default_sharding, abstract_items)
            args = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)
            restored = manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
            return step, {k: restored[STATE][k] for k in abstract_items}
        except Exception as e:  # noqa: BLE001
            logging.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous "
                            "one", step, directory, e)
    raise MissingArtifactError(f"no readable checkpoint in {directory}")


def latest_step(directory: str) -> int:
    """Newest step saved in `directory` (an error when there is none)."""
    step = make_manager(directory, keep=1, read_only=True).latest_step()
    if step is None:
        raise MissingArtifactError(f"no checkpoint found in {directory}")
    return int(step)


def _with_default_sharding(x):
    """Unsharded targets land on this process's first device as jax.Arrays (on a multi-process
    run jax.devices()[0] belongs to process 0, which other processes cannot write to)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _pick_steps(manager, directory, step: int | None) -> list[int]:
    """Steps to try, newest first: all of them, or just `step` (which must exist)."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise MissingArtifactError(f"no checkpoint found in {directory}")
    if step is None:
        return steps
    if int(step) not in steps:
        raise InputError(f"no checkpoint for step {step} in {directory}; it has steps "
                         f"{sorted(steps)}")
    return [int(step)]


def restore_config(directory: str, step: int | None = None) -> dict:
    """The config JSON stored next to the newest readable checkpoint (or `step`): what the run
    was trained with. An unreadable newest one falls back to the previous, as the params do
    (restore_state_items), so a run killed mid-save still loads."""
    manager = make_manager(directory, keep=1, read_only=True)
    for found in _pick_steps(manager, directory, step):
        try:
            restored = manager.restore(found, args=ocp.args.Composite(
                **{CONFIG: ocp.args.JsonRestore()}))
            return json.loads(json.dumps(restored[CONFIG]))
        except Exception as e:  # noqa: BLE001
            logging.warning("config of the checkpoint at step %d in %s is unreadable (%s); trying "
                            "the previous one", found, directory, e)
    raise MissingArtifactError(f"no checkpoint in {directory} has a readable config")
