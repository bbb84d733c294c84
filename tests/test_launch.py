"""Launch scripts: bash syntax, and the local multi-process launcher's bookkeeping (with a stub python)."""
import os
import pathlib
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax_and_header(name):
    path = LAUNCH / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "set -euo pipefail" in text
    assert "Usage:" in text.split("set -euo pipefail")[0], f"{name}: document usage at the top"
    assert os.access(path, os.X_OK), f"{name} is not executable"


def _stub_python(tmp_path, body: str) -> str:
    """A fake interpreter: `-c` goes to the real python, `-m mmjax.main ...` runs `body`."""
    stub = tmp_path / "fake_python"
    stub.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -c ]]; then exec {sys.executable} "$@"; fi
echo "args: $*"
echo "env: $MMJAX_COORDINATOR $MMJAX_NUM_PROCESSES $MMJAX_PROCESS_ID $JAX_PLATFORMS"
{body}
""")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return str(stub)


def _run_local(tmp_path, body, n=3, extra=()):
    env = dict(os.environ, PYTHON=_stub_python(tmp_path, body))
    return subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), str(n), "cfg.py:smoke",
                           str(tmp_path / "wd"), *extra], env=env, capture_output=True,
                          text=True, timeout=60)


def test_local_multiprocess_success_sets_env_and_logs(tmp_path):
    res = _run_local(tmp_path, "exit 0", extra=["--mode=model", "--config.train.steps=2"])
    assert res.returncode == 0, res.stderr
    logs = sorted((tmp_path / "wd" / "logs").glob("process_*.log"))
    assert [p.name for p in logs] == ["process_0.log", "process_1.log", "process_2.log"]
    ports = set()
    for i, log in enumerate(logs):
        text = log.read_text()
        assert (f"args: -m mmjax.main --config=cfg.py:smoke --workdir={tmp_path / 'wd'} "
                f"--mode=model --config.train.steps=2") in text
        coord, nproc, pid, platform = text.split("env: ")[1].split()[:4]
        assert (nproc, pid, platform) == ("3", str(i), "cpu")
        assert coord.startswith("127.0.0.1:")
        ports.add(coord)
    assert len(ports) == 1  # One coordinator for all processes.


def test_local_multiprocess_failure_propagates_and_stops_peers(tmp_path):
    # Process 1 fails at once; the others would hang (as JAX peers would): they must be stopped.
    body = 'if [[ "$MMJAX_PROCESS_ID" == 1 ]]; then echo boom >&2; exit 7; fi; exec sleep 30'
    res = _run_local(tmp_path, body)
    assert res.returncode == 7
    assert "process 1 exited with status 7" in res.stderr
    assert "boom" in res.stderr  # The failed log's tail is shown.


def test_local_multiprocess_usage_errors(tmp_path):
    assert _run_local(tmp_path, "exit 0", n="zero").returncode == 2
    res = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh")], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "Usage:" in res.stderr
