"""Coordinated preemption: SIGTERM to ONE of two processes (127.0.0.1, jax.distributed, CPU).

Both processes must checkpoint the same step and exit 143 (not hang in mismatched collectives);
the rerun resumes there and logs exactly the losses of an uninterrupted two-process run. The
workers are the real CLI on the toy task (tests/reliability_worker.py), ending like a stage does.
"""
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from test_reliability import REPO, complete_checkpoints, loss_rows, worker_cmd
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

STEPS = 16
RUN = {"mesh.data": -1, "train.checkpoint_every": 1000, "worker.as_stage": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(tmp_path, name, workdir, service=True,
               **overrides) -> list[tuple[subprocess.Popen, str]]:
    """Two CLI processes of one job; output in <tmp>/<name>_<i>.log (a full pipe would block).
    `service=False` disables JAX's preemption service (mmjax then all-gathers the local flags)."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        env = child_env()
        env.update(MMJAX_COORDINATOR=address, MMJAX_NUM_PROCESSES="2", MMJAX_PROCESS_ID=str(i),
                   JAX_ENABLE_PREEMPTION_SERVICE="true" if service else "false")
        log_path = str(tmp_path / f"{name}_{i}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(worker_cmd(workdir, STEPS, **RUN, **overrides), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO, env=env)
        procs.append((proc, log_path))
    return procs


def finish(procs, timeout=240) -> list[tuple[int, str]]:
    out = []
    for proc, log_path in procs:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang is the failure this test exists to catch
            for p, _ in procs:
                p.kill()
            raise AssertionError(f"process hung; log:\n{open(log_path).read()[-3000:]}")
        out.append((code, open(log_path).read()))
    return out


@pytest.mark.parametrize("service", [True, False], ids=["sync_service", "allgather"])
def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_exact(tmp_path, service):
    ref_dir = tmp_path / "reference"
    for code, log in finish(start_pair(tmp_path, "reference", ref_dir)):
        assert code == 0, log[-3000:]
    reference = dict(loss_rows(ref_dir))
    assert sorted(reference) == list(range(1, STEPS + 1))

    workdir = tmp_path / "run"
    procs = start_pair(tmp_path, "preempted", workdir, service, **{"worker.step_delay": 0.15})
    deadline = time.monotonic() + 240
    while max([s for s, _ in loss_rows(workdir)], default=0) < 4:
        assert all(p.poll() is None for p, _ in procs), "a worker exited early"
        assert time.monotonic() < deadline, "no step 4 in time"
        time.sleep(0.02)
    procs[1][0].send_signal(signal.SIGTERM)  # process 1 only
    results = finish(procs)
    stopped = []
    for i, (code, log) in enumerate(results):
        assert code == 143, f"process {i}: exit {code}\n{log[-3000:]}"
        assert "mmjax: error: toy training stopped at step" in log
        assert ("SIGTERM flags all-gathered every 1 step(s)" in log) != service
        stopped.append(int(re.search(r"WORKER_DONE step=(\d+) preempted=True", log).group(1)))
    assert stopped[0] == stopped[1] < STEPS, stopped
    assert complete_checkpoints(workdir) == [stopped[0]]
    assert max(s for s, _ in loss_rows(workdir)) == stopped[0]

    for i, (code, log) in enumerate(finish(start_pair(tmp_path, "resumed", workdir, service))):
        assert code == 0, f"process {i}:\n{log[-3000:]}"
        assert f"resumed toy from step {stopped[0]}" in log
    rows = loss_rows(workdir)
    assert [s for s, _ in rows] == list(range(1, STEPS + 1)), "no step lost or redone"
    for step, loss in rows:
        assert loss == reference[step], f"step {step}: {loss} != uninterrupted {reference[step]}"
