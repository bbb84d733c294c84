"""Launch scripts: bash syntax, the local multi-process launcher's bookkeeping (with a stub python),
and the TPU pod / SLURM scripts run against fake gcloud / srun / scontrol commands."""
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------- cluster scripts
# The scripts themselves run; fake `gcloud` / `srun` / `scontrol` / `python3` written here stand
# in for the cluster (they record their arguments and run the remote commands locally).

FAKE_MMJAX = """#!/usr/bin/env bash
# Stands in for `python -m mmjax.main`: SIGTERM -> exit 143 like a preempted mmjax run.
echo "args: $*"
echo "env: MMJAX_DISTRIBUTED_AUTO=${MMJAX_DISTRIBUTED_AUTO:-} MMJAX_COORDINATOR=${MMJAX_COORDINATOR:-} \
MMJAX_NUM_PROCESSES=${MMJAX_NUM_PROCESSES:-} MMJAX_PROCESS_ID=${MMJAX_PROCESS_ID:-} \
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
trap 'echo "fake mmjax: SIGTERM, checkpointing"; exit 143' TERM
if [[ -n "${FAKE_EXIT:-}" ]]; then exit "$FAKE_EXIT"; fi
touch "${FAKE_STARTED:-/dev/null}"
while true; do sleep 0.05; done
"""

FAKE_GCLOUD = """#!/usr/bin/env bash
# `gcloud compute tpus tpu-vm ssh|scp|create|delete ...` against FAKE_WORKERS local directories.
echo "gcloud $*" >> "$FAKE_ROOT/gcloud_calls.txt"
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || { echo "fake gcloud: unexpected $*" >&2; exit 9; }
verb="$4"; shift 4
case "$verb" in
  ssh)
    cmd=""
    for a in "$@"; do [[ "$a" == --command=* ]] && cmd="${a#--command=}"; done
    rc=0
    for ((i = 0; i < FAKE_WORKERS; i++)); do
      (cd "$FAKE_ROOT/worker_$i" && HOME="$FAKE_ROOT/worker_$i" MMJAX_WORKER_ID=$i \
        PATH="$FAKE_ROOT/bin:$PATH" bash -c "$cmd") || rc=$?
    done
    exit $rc ;;
  scp)  # remote -> local: NAME:PATH DEST
    src="$1"; dest="$2"
    for ((i = 0; i < FAKE_WORKERS; i++)); do
      (cd "$FAKE_ROOT/worker_$i" && cp -r ${src#*:} "$dest")
    done ;;
  create|delete) ;;
esac
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _fake_pod(tmp_path, workers=2):
    root = tmp_path / "pod"
    (root / "bin").mkdir(parents=True)
    _executable(root / "bin" / "gcloud", FAKE_GCLOUD)
    _executable(root / "bin" / "python3", FAKE_MMJAX)
    for i in range(workers):
        (root / f"worker_{i}" / "mmjax").mkdir(parents=True)
    return root


def _pod(root, *args, workers=2, timeout=60, **env):
    full = dict(os.environ, PATH=f"{root / 'bin'}:{os.environ['PATH']}", FAKE_ROOT=str(root),
                FAKE_WORKERS=str(workers), TPU_NAME="pod1")
    full.update({"WORKDIR": "gs://test-bucket/run", **env})
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def _worker_file(root, i, suffix):
    return root / f"worker_{i}" / "mmjax_logs" / f"worker_{i}.{suffix}"


def _wait_for(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_tpu_pod_runs_detached_with_per_worker_logs_and_verbs(tmp_path):
    root = _fake_pod(tmp_path)
    try:
        res = _pod(root, "--", "--config.train.steps=5", "--config.fsq.levels=(8,8)")
        assert res.returncode == 0, res.stderr
        assert "worker 0: started" in res.stdout and "worker 1: started" in res.stdout
        for i in range(2):  # each worker: its own log, written by the detached process
            log = _worker_file(root, i, "log")
            _wait_for(lambda: "args:" in (log.read_text() if log.exists() else ""), "a log")
            text = log.read_text()
            assert ("args: -m mmjax.main --config=configs/mot_shapes.py:base "
                    "--workdir=gs://test-bucket/run --mode=pipeline --config.train.steps=5 "
                    "--config.fsq.levels=(8,8)") in text
            assert "MMJAX_DISTRIBUTED_AUTO=1" in text
        calls = (root / "gcloud_calls.txt").read_text()
        assert "compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=all" in calls

        status = _pod(root, "status")
        assert status.returncode == 0, status.stderr
        assert "worker 0: running (pid" in status.stdout and "worker 1: running" in status.stdout

        again = _pod(root)  # a second run while the first is alive is refused
        assert again.returncode != 0 and "a run is still alive" in again.stderr

        logs = _pod(root, "logs", "3")
        assert "===== worker 0: mmjax_logs/worker_0.log" in logs.stdout
        assert "===== worker 1" in logs.stdout and "args:" in logs.stdout
        assert _pod(root, "logs", "x").returncode == 2

        stop = _pod(root, "stop")
        assert "worker 0: SIGTERM sent" in stop.stdout and "worker 1: SIGTERM sent" in stop.stdout
        for i in range(2):
            _wait_for(_worker_file(root, i, "status").exists, "the exit status")
        status = _pod(root, "status")
        assert status.stdout.count("exited (status 143)") == 2, status.stdout

        fetched = tmp_path / "fetched"
        res = _pod(root, "fetch", str(fetched))
        assert res.returncode == 0, res.stderr
        assert "fake mmjax: SIGTERM" in (fetched / "worker_1.log").read_text()
        assert (fetched / "worker_0.log").exists()
    finally:  # never leave a fake worker running
        for i in range(2):
            pid_file = _worker_file(root, i, "pid")
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), 9)
                except (ProcessLookupError, ValueError):
                    pass


def test_tpu_pod_wait_reports_the_status_and_teardown_needs_wait(tmp_path):
    root = _fake_pod(tmp_path)
    assert "needs --wait" in _pod(root, "--teardown").stderr
    res = _pod(root, "--wait", "--teardown", POLL="0.2", FAKE_EXIT="0")
    assert res.returncode == 0, res.stderr
    assert "every worker finished" in res.stdout
    assert "tpu-vm delete pod1" in (root / "gcloud_calls.txt").read_text()
    res = _pod(root, "--wait", POLL="0.2", FAKE_EXIT="143")
    assert res.returncode == 143, res.stdout + res.stderr
    assert "status 143" in res.stderr
    assert _pod(root, WORKDIR="").returncode == 2  # WORKDIR is required


FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_ROOT/calls.txt"
while [[ "$1" == --* ]]; do shift; done  # srun's own options; then the task command
export SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_ROOT/calls.txt"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node1\\ngpu-node2\\n'; fi
"""


def _fake_slurm(tmp_path):
    root = tmp_path / "slurm"
    (root / "bin").mkdir(parents=True)
    _executable(root / "bin" / "srun", FAKE_SRUN)
    _executable(root / "bin" / "scontrol", FAKE_SCONTROL)
    _executable(root / "bin" / "fake_python", FAKE_MMJAX)
    return root


def _sbatch(root, tmp_path, **env):
    full = dict(os.environ, PATH=f"{root / 'bin'}:{os.environ['PATH']}", FAKE_ROOT=str(root),
                PYTHON=str(root / "bin" / "fake_python"), CONFIG="configs/mot_shapes.py:smoke",
                WORKDIR="gs://test-bucket/run", SLURM_JOB_NODELIST="gpu-node[1-2]",
                SLURM_JOB_ID="42", SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2",
                FAKE_STARTED=str(root / "started"))
    full.update(env)
    log = open(tmp_path / "sbatch.log", "w")
    return subprocess.Popen(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config.train.steps=3"],
                            env=full, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)


def test_slurm_script_asks_for_signal_and_requeue():
    header = (LAUNCH / "slurm_gpu.sbatch").read_text().split("set -euo pipefail")[0]
    assert "#SBATCH --signal=B:TERM@120" in header
    assert "#SBATCH --requeue" in header
    assert "#SBATCH --open-mode=append" in header


def test_slurm_sigterm_is_forwarded_to_the_tasks_and_143_requeues(tmp_path):
    root = _fake_slurm(tmp_path)
    proc = _sbatch(root, tmp_path)
    try:
        _wait_for((root / "started").exists, "the task to start")
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 delivers to the batch shell
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "sbatch.log").read_text()
    assert "forwarding it to the tasks" in out and "fake mmjax: SIGTERM" in out
    assert ("args: -m mmjax.main --config=configs/mot_shapes.py:smoke "
            "--workdir=gs://test-bucket/run --mode=model --config.train.steps=3") in out
    assert ("MMJAX_COORDINATOR=gpu-node1:20042 MMJAX_NUM_PROCESSES=16 MMJAX_PROCESS_ID=0 "
            "CUDA_VISIBLE_DEVICES=0") in out
    calls = (root / "calls.txt").read_text()
    assert "srun --kill-on-bad-exit=1 bash -c" in calls
    assert "scontrol requeue 42" in calls


def test_slurm_success_or_failure_does_not_requeue(tmp_path):
    root = _fake_slurm(tmp_path)
    assert _sbatch(root, tmp_path, FAKE_EXIT="0").wait(timeout=30) == 0
    assert _sbatch(root, tmp_path, FAKE_EXIT="2").wait(timeout=30) == 2
    assert _sbatch(root, tmp_path, FAKE_EXIT="143", MMJAX_REQUEUE="0").wait(timeout=30) == 143
    assert "requeue" not in (root / "calls.txt").read_text()


def test_slurm_makes_a_local_workdir_but_no_local_gs_directory(tmp_path):
    root = _fake_slurm(tmp_path)
    assert _sbatch(root, tmp_path, FAKE_EXIT="0").wait(timeout=30) == 0  # WORKDIR=gs://...
    assert not (tmp_path / "gs:").exists()
    shared = tmp_path / "shared" / "run"
    assert _sbatch(root, tmp_path, FAKE_EXIT="0", WORKDIR=str(shared)).wait(timeout=30) == 0
    assert shared.is_dir()
