"""Two processes on 127.0.0.1 whose --workdir paths are different local directories (a host that
does not have the shared mount): process 1 fails at once with one line naming its path, instead
of waiting at a barrier for artifacts it will never see."""
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # two real processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_process_that_cannot_see_the_workdir_names_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    procs, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"process_{i}.log", "w+"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mmjax.main", f"--config={REPO}/configs/mot_shapes.py:smoke",
             f"--workdir={tmp_path / f'host{i}'}", "--mode=data",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=tmp_path, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
    try:
        assert procs[1].wait(timeout=240) == 2
    finally:
        for p in procs:  # process 0 may wait for its peer at shutdown
            if p.poll() is None:
                p.kill()
                p.wait()
    logs[1].seek(0)
    last = logs[1].read().strip().splitlines()[-1]
    assert last.startswith(f"mmjax: error: {tmp_path / 'host1'}: process 1 of 2 cannot see"), last
    assert "missing" in last
