"""Stages that write shared artifacts on a multi-process (pod / cluster) run: once, then agree.

Why: every process of a pod job runs the same command. A dataset, a SentencePiece model or a token
sidecar built by all of them at once races on the same files (TFDS: "Cannot rename ... already
exists"), so process 0 builds and the others wait at a barrier, then read. Two failure modes must
be one clear line on every process rather than a hang:
- process 0 fails while building: it still reaches the agreement, so the others learn of it and
  stop (naming process 0's log) instead of waiting forever;
- a worker cannot see what process 0 wrote (the workdir is a local disk, not a bucket or a shared
  filesystem): that worker names the path it looked at, and every other process stops too.

The agreements are tiny collectives over all devices (`multihost_utils.process_allgather`), so
they also act as the barrier. In a single process every function here is a plain call.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import jax
import numpy as np

from mmjax.errors import MmjaxError, StorageError

T = TypeVar("T")


class PeerFailedError(MmjaxError):
    """Another process failed (its own log has the one-line reason); this one stops too."""


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def shard_range(num: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of the `index`-th of `count` contiguous, near-equal shares of `num` items.

    Contiguous so that the shards read in order are the single-process order, item for item.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    base, extra = divmod(num, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def all_ok(ok: bool) -> list[bool]:
    """Every process's `ok`, in process order (a collective: every process must call it)."""
    if not is_multiprocess():
        return [bool(ok)]
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(int(bool(ok)), np.int32))
    return [bool(v) for v in np.asarray(flags).reshape(-1)]


def agree(name: str, error: BaseException | None) -> None:
    """Collective: raises this process's `error`, else PeerFailedError naming the failed peers."""
    oks = all_ok(error is None)
    if error is not None:
        raise error
    failed = [i for i, ok in enumerate(oks) if not ok]
    if failed:
        raise PeerFailedError(
            f"{name}: process(es) {', '.join(map(str, failed))} failed (their logs say why); "
            f"process {jax.process_index()} stops too")


def run_once(name: str, build: Callable[[], T], verify: Callable[[], T]) -> T:
    """`build()` on process 0; after a barrier `verify()` on the others; every process agrees.

    `verify` checks (read-only) that what `build` wrote is visible on this process and returns the
    same summary `build` does; it raises `not_visible(...)` for a missing artifact.
    """
    if not is_multiprocess():
        return build()
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = build()
        except Exception as e:  # noqa: BLE001 - re-raised by agree() after the peers learn of it
            error = e
    agree(f"{name} (built by process 0)", error)
    if jax.process_index() != 0:
        try:
            result = verify()
        except Exception as e:  # noqa: BLE001 - re-raised by agree()
            error = e
    agree(f"{name} (read by every process)", error)
    logging.info("%s: built by process 0, visible on process %d", name, jax.process_index())
    return result


def together(name: str, fn: Callable[[], T]) -> T:
    """`fn()` on every process, then agree: one process failing (e.g. a missing input on a worker
    whose workdir is not shared) stops them all, instead of leaving the others in a collective."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised by agree()
        if not is_multiprocess():
            raise
        error = e
    agree(name, error)
    return result


def not_visible(path, what: str, writer: str = "process 0") -> StorageError:
    """The one-line error of a worker that cannot see an artifact another process wrote."""
    return StorageError(
        f"process {jax.process_index()} cannot see {what} at {path}, which {writer} wrote: "
        "every process must see the same workdir (a gs:// bucket or a shared filesystem)")


def require_visible(paths: Sequence, what: str, writer: str = "process 0") -> None:
    """`not_visible` for the first of `paths` (epath.Paths) that does not exist on this process."""
    for path in paths:
        if not path.exists():
            raise not_visible(path, what, writer)
