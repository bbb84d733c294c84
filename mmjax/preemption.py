"""When to stop for a preemption (SIGTERM), agreed by every process of a run.

Why agreement: a SIGTERM reaches one host (or the hosts at different times). If only that host
stopped to save, it would enter the collective checkpoint save while the others ran the next
step's collectives, and the job would hang. So the decision is a step number all processes agree
on, and every one of them saves that step and exits 143.

- One process: a Python SIGTERM handler sets a flag; the loop stops at the next step boundary.
- Several processes (jax.distributed initialised): JAX's preemption sync manager (on by default,
  `jax_enable_preemption_service`) owns SIGTERM. On a notice it runs a protocol over the
  coordination service: every process reports the last step it passed to
  `multihost_utils.reached_preemption_sync_point`, and the sync point is the largest + 1, so each
  process must call it at every step (a cheap local check until a notice arrives). No Python
  handler is installed then: it would replace the manager's C++ handler and hide the signal.
- Several processes without the manager (the service disabled): the local flags are all-gathered
  every `check_every` steps (one tiny collective, so not every step).

Limits of the multi-process mode: the manager's handler stays installed for the whole process,
so a SIGTERM that arrives outside a training loop (data build, tokenize, sample) does not stop
the process at once: the stage goes on, and a later training loop stops only if its step counter
passes the agreed step number; otherwise the scheduler's SIGKILL ends the job. Every stage is
idempotent, so the rerun resumes either way. A notice that arrives after the last step of a
training loop lets that loop finish normally.
"""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np


def _sync_manager():
    """JAX's preemption sync manager, or None (single process, or the service disabled)."""
    from jax._src import distributed  # the state jax.distributed.initialize() fills in
    if distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


class PreemptionWatch:
    """Context manager for a training loop: `should_stop(step)` after every step, on every
    process."""

    def __init__(self, check_every: int = 1):
        self.requested = False  # a SIGTERM reached this process (Python handler modes)
        self.check_every = max(int(check_every), 1)
        self._old = None
        self._installed = False
        self.mode = "local"

    def __enter__(self):
        if jax.process_count() > 1:
            self.mode = "service" if _sync_manager() is not None else "allgather"
            how = ("JAX's preemption sync service" if self.mode == "service" else
                   f"SIGTERM flags all-gathered every {self.check_every} step(s)")
            logging.info("preemption: every process stops at one agreed step (%s)", how)
        if self.mode != "service":
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing and stopping at the next step boundary")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """True at the step every process stops at (call it once per step, on every process)."""
        if self.mode == "local":
            return self.requested
        if self.mode == "service":
            from jax.experimental import multihost_utils
            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        else:
            if step % self.check_every:
                return False
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
            stop = bool(np.asarray(flags).any())
        if stop:
            logging.warning("preemption notice (SIGTERM) on some process: every process "
                            "checkpoints step %d and stops", step)
        return stop

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)
