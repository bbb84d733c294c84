"""The whole smoke pipeline as two processes (launch/local_multiprocess.sh, 127.0.0.1, CPU).

Process 0 builds the data and SentencePiece once, the tokenize stage is sharded over both
processes, and reading the shards in order gives exactly the tokens one process writes. A worker
whose workdir is not the one process 0 wrote to fails in one line naming the path it looked at,
and process 0 stops too (no hang).
"""
import dataclasses
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from mmjax import io
from mmjax.data import image_tokens, pipeline
from mmjax.stages import tokenize
from mmjax.workdir import Workdir
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/mot_shapes.py:smoke"


def _env():
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_two_process_pipeline_on_a_fresh_workdir(tmp_path):
    workdir = tmp_path / "fresh"  # does not exist yet
    res = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", CONFIG,
                          str(workdir), "--mode=pipeline"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=1500)
    logs = "".join((workdir / "logs" / f"process_{i}.log").read_text()[-2000:] for i in (0, 1)
                   if (workdir / "logs" / f"process_{i}.log").exists())
    assert res.returncode == 0, res.stdout + res.stderr + logs
    assert (workdir / "results_pipeline.json").exists()
    assert (workdir / "samples" / "eval.json").exists()

    spec = importlib.util.spec_from_file_location("mot_shapes", REPO / "configs" / "mot_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    wd = Workdir.from_config(config, str(workdir))
    for split in image_tokens.SPLITS:
        meta = io.read_json(wd.image_token_files(split)[1])
        assert meta["files"] == [f"{split}-00000-of-00002.array_record",
                                 f"{split}-00001-of-00002.array_record"]
    # One process into another tokens dir: the same records in the same order.
    single = dataclasses.replace(wd, tokens_dir_override=str(tmp_path / "single_tokens"))
    tokenize.run(config, single)
    for split in image_tokens.SPLITS:
        files = io.read_json(single.image_token_files(split)[1])["files"]
        assert files == [f"{split}.array_record"]
        n = len(pipeline.image_caption_dataset(config.data, split, wd.data_dir))
        sharded = image_tokens.load_tokens(wd, split, n)
        one = image_tokens.load_tokens(single, split, n)
        np.testing.assert_array_equal(np.stack([sharded[i] for i in range(n)]),
                                      np.stack([one[i] for i in range(n)]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path, per_process_args) -> list[tuple[int, list[str]]]:
    """Runs `--mode=data` in 2 processes; (exit code, its `mmjax: error:` lines) of each."""
    address, procs = f"127.0.0.1:{_free_port()}", []
    for i, args in enumerate(per_process_args):
        env = dict(_env(), MMJAX_COORDINATOR=address, MMJAX_NUM_PROCESSES="2",
                   MMJAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu")
        log = open(tmp_path / f"process_{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mmjax.main", f"--config={CONFIG}", "--mode=data", *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    out = [(tmp_path / f"process_{i}.log").read_text() for i in (0, 1)]
    return [(c, [l for l in o.splitlines() if l.startswith("mmjax: error:")])
            for c, o in zip(codes, out)]


def test_a_worker_that_cannot_see_the_workdir_fails_naming_the_path(tmp_path):
    # Process 1 is given another (empty) directory, as a worker whose "shared" workdir is a
    # local disk would see it: the check before any stage (cloud.check_shared) names it.
    (c0, e0), (c1, e1) = _run_two(tmp_path, [[f"--workdir={tmp_path / 'shared'}"],
                                             [f"--workdir={tmp_path / 'worker_local'}"]])
    assert (c0, c1) == (2, 2), (e0, e1)
    assert len(e1) == 1 and e1[0].startswith(
        f"mmjax: error: {tmp_path / 'worker_local'}: process 1 of 2 cannot see the workdir"), e1
    assert len(e0) == 1 and "the shared workdir check: process(es) 1 failed" in e0[0], e0


def test_a_worker_that_cannot_see_the_data_dir_fails_naming_the_path(tmp_path):
    # A shared workdir, but process 1's data.data_dir override is a local disk: the data stage's
    # agreement names the dataset path on that worker, and process 0 stops too.
    shared = f"--workdir={tmp_path / 'shared'}"
    (c0, e0), (c1, e1) = _run_two(tmp_path, [
        [shared, f"--config.data.data_dir={tmp_path / 'shared_data'}"],
        [shared, f"--config.data.data_dir={tmp_path / 'worker_local' / 'data'}"]])
    assert (c0, c1) == (2, 2), (e0, e1)
    assert len(e1) == 1 and "process 1 cannot see dataset 'shapes' at " \
        f"{tmp_path / 'worker_local' / 'data'}" in e1[0], e1
    assert len(e0) == 1 and "process(es) 1 failed" in e0[0], e0
