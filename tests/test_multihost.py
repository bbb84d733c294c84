"""Two processes on 127.0.0.1 (jax.distributed, CPU) train and agree with one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

import pytest
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(nproc: int, workdir: str) -> list[float]:
    address = f"127.0.0.1:{free_port()}"
    env = child_env()
    os.makedirs(workdir, exist_ok=True)
    # Logs go to files: a full stderr pipe would block one process while the other waits for it.
    logs = [open(os.path.join(workdir, f"process_{i}.log"), "w+") for i in range(nproc)]
    procs = [subprocess.Popen([sys.executable, WORKER, address, str(nproc), str(i), workdir],
                              stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
             for i, log in enumerate(logs)]
    for p, log in zip(procs, logs):
        p.wait(timeout=300)
        log.seek(0)
        text = log.read()
        assert p.returncode == 0, text[-3000:]
        if p is procs[0]:
            result = json.loads(text.strip().splitlines()[-1])
    return result


def test_two_processes_match_one(tmp_path):
    single = run_workers(1, str(tmp_path / "single"))  # 2 local devices
    multi = run_workers(2, str(tmp_path / "multi"))  # 2 processes x 2 devices
    assert len(single) == len(multi) == 5
    np.testing.assert_allclose(multi, single, rtol=2e-5, atol=1e-6)


LATE_WORKER = """
import sys, time
from jax.experimental import multihost_utils
from mmjax import parallel
address, process_id, delay_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
parallel.initialize_distributed(address, 2, process_id)
if process_id == 1:
    time.sleep(delay_s)  # e.g. a first compile on a loaded host
multihost_utils.sync_global_devices("first collective after start-up")
print("joined")
"""
GLOO_JOIN_TIMEOUT_S = 30  # Gloo's fixed wait for the other processes at its context's creation


def test_a_process_reaching_its_first_collective_late_still_joins(tmp_path):
    """The first collective of a job may come far apart in two processes (one compiles longer);
    initialize_distributed meets the others at once, so Gloo's 30 s join window is not spent
    there. Without that meeting this fails with 'Gloo context initialization failed'."""
    address = f"127.0.0.1:{free_port()}"
    env = child_env(JAX_PLATFORMS="cpu")
    late = str(GLOO_JOIN_TIMEOUT_S + 5)
    procs = [subprocess.Popen([sys.executable, "-c", LATE_WORKER, address, str(i), late], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:  # a process left waiting for the other must not outlive the test
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and out.strip().endswith("joined"), out[-3000:]
