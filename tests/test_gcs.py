"""The smoke pipeline with --workdir=gs://test-bucket/run against a real GCS API server on
127.0.0.1 (fake-gcs-server, tests/gcs_server.py): every stage runs with STORAGE_EMULATOR_HOST as
the only storage setting, every artifact lands in the bucket, a SIGKILL during model training is
resumed from the checkpoints in the bucket (on a fresh local cache, as on another host), and no
local directory named `gs:` appears."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from gcs_server import fake_gcs, list_objects, read_object
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET, RUN = "test-bucket", "run"
STEPS, EVERY = 12, 2  # model steps; a checkpoint every EVERY steps (the kill waits for one)
ARGS = [f"--config={REPO}/configs/mot_shapes.py:smoke", f"--workdir=gs://{BUCKET}/{RUN}",
        "--mode=pipeline", f"--config.train.steps={STEPS}",
        f"--config.train.checkpoint_every={EVERY}", "--config.train.log_every=1",
        "--config.sample.num_eval=4", "--config.sample.num_samples=4",
        "--config.sample.batch_size=4", "--config.sample.interleaved_rounds=1"]


def _env(url, cache):
    # no test-wide JAX_COMPILATION_CACHE_DIR: the run keeps its cache in the bucket (checked)
    env = child_env(drop_prefixes=(
        "JAX_COMPILATION_CACHE", "STORAGE_EMULATOR", "TENSORSTORE_GCS", "GOOGLE_", "GCSFS_"))
    # TMPDIR: the SIGKILLed run cannot remove its local event-file directory (metrics_writer),
    # so it is left in the test's own tmp, not in the machine's /tmp.
    tmp = cache + "_tmp"
    os.makedirs(tmp, exist_ok=True)
    env.update(JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=url, MMJAX_CACHE_DIR=cache, TMPDIR=tmp,
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    return env


def _committed_model_steps(url):
    names = list_objects(url, BUCKET, f"{RUN}/model/checkpoints/")
    found = (re.fullmatch(rf"{RUN}/model/checkpoints/(\d+)/commit_success.txt", n) for n in names)
    return sorted(int(m.group(1)) for m in found if m)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs_e2e")
    cwd = root / "cwd"
    cwd.mkdir()
    with fake_gcs(str(root / "server")) as url:
        with open(root / "first.log", "w") as log:
            first = subprocess.Popen([sys.executable, "-m", "mmjax.main", *ARGS], cwd=cwd,
                                     env=_env(url, str(root / "cache1")), stdout=log,
                                     stderr=subprocess.STDOUT)
            deadline = time.time() + 600
            while not _committed_model_steps(url) and first.poll() is None:
                assert time.time() < deadline, "no model checkpoint within 10 minutes"
                time.sleep(0.2)
            first.kill()  # SIGKILL: no clean-up, no final checkpoint
            first.wait(timeout=60)
        at_kill = _committed_model_steps(url)
        # Another host's view: a fresh local cache, so data and tokens come from the bucket.
        second = subprocess.run([sys.executable, "-m", "mmjax.main", *ARGS], cwd=cwd,
                                env=_env(url, str(root / "cache2")), capture_output=True,
                                text=True, timeout=900)
        objects = list_objects(url, BUCKET, f"{RUN}/")
        results = json.loads(read_object(url, BUCKET, f"{RUN}/results_pipeline.json"))
        metrics = read_object(url, BUCKET, f"{RUN}/model/train_metrics.jsonl").decode()
    yield dict(first_rc=first.returncode, first_log=(root / "first.log").read_text(),
               at_kill=at_kill, second=second, objects=objects, results=results,
               metrics=[json.loads(line) for line in metrics.splitlines()], cwd=cwd, root=root)


def test_first_run_was_killed_mid_training(runs):
    assert runs["first_rc"] == -9, runs["first_log"][-3000:]
    assert runs["at_kill"] and max(runs["at_kill"]) < STEPS  # killed before the model finished


def test_rerun_resumes_from_the_bucket_and_finishes(runs):
    second = runs["second"]
    assert second.returncode == 0, second.stderr[-4000:]
    resumed = re.findall(r"resumed model from step (\d+)", second.stderr)
    assert resumed and int(resumed[0]) in runs["at_kill"], second.stderr[-3000:]
    assert runs["results"]["model"]["step"] == STEPS
    assert runs["results"]["tokenizer"]["step"] >= 1 and "t2i_prompt_acc" in runs["results"]["sample"]
    steps = [r["step"] for r in runs["metrics"]]
    assert steps[-1] == STEPS and min(steps) == 1  # rows of both attempts, in the bucket


def test_every_artifact_is_in_the_bucket(runs):
    objects = set(runs["objects"])
    prefix = f"{RUN}/"
    expected = ["data/spm_shapes_256.model", "results_pipeline.json",
                "tokenizer/train_metrics.jsonl", "tokenizer/eval_validation.json",
                "tokenizer/reconstructions_validation.png", "model/train_metrics.jsonl",
                "samples/eval.json", "samples/captions.txt", "samples/text_to_image.png"]
    expected += [f"image_tokens/{s}.{ext}" for s in ("train", "validation", "test")
                 for ext in ("array_record", "json")]
    assert not [e for e in expected if prefix + e not in objects]
    for pattern in (r"data/mmjax_shapes/[^/]+/1\.0\.0/dataset_info\.json",
                    r"data/mmjax_shapes/[^/]+/1\.0\.0/mmjax_shapes-train\.array_record-.*",
                    r"tokenizer/checkpoints/\d+/commit_success\.txt",
                    r"(tokenizer|model)/tensorboard/train/events\.out\.tfevents\..*",
                    r"jax_cache/.+"):
        assert any(re.fullmatch(prefix + pattern, o) for o in objects), pattern


def test_no_local_gs_directory(runs):
    for where in (runs["cwd"], runs["root"], REPO):
        assert not os.path.exists(os.path.join(where, "gs:")), where
