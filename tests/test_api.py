"""mmjax.load: a finished smoke workdir generates from plain strings and arrays, batches to the
sampler's compiled size, and rejects bad input with one clear sentence."""
import os
import subprocess
import sys

import numpy as np
import pytest
from child_env import child_env

pytestmark = pytest.mark.slow  # trains the smoke pipeline first

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("api"))
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "mmjax.main", "--config=configs/mot_shapes.py:smoke",
                          f"--workdir={wd}", "--mode=pipeline", "--config.sample.num_eval=8",
                          "--config.train.ema_decay=0.9",  # sampling reads the EMA weights
                          "--config.sample.batch_size=4", "--config.sample.interleaved_rounds=0",
                          "--config.mesh.cpu_devices=2"],  # the demo's split of a CPU host
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(wd, "pipeline.log"), "w") as f:
        f.write(res.stderr)
    return wd


def test_the_command_line_splits_the_cpu_host(workdir):
    """mesh.cpu_devices=2 reached JAX before it started: both trained stages ran data-parallel
    over 2 CPU devices (without it this process has one)."""
    with open(os.path.join(workdir, "pipeline.log")) as f:
        log = f.read()
    for stage in ("tokenizer", "model"):
        assert f"{stage}: mesh {{'data': 2, 'fsdp': 1, 'tensor': 1}} over 2 cpu device(s)" in log


@pytest.fixture(scope="module")
def run(workdir):
    import mmjax
    return mmjax.load(workdir)


def test_text_to_image_caption_reconstruct_interleave(run):
    size = run.image_size
    images = run.text_to_image(["a large red circle in the top left", "a small blue square"] * 3)
    assert images.dtype == np.uint8 and images.shape == (6, size, size, 3)
    # Batching pads to sample.batch_size (4): 6 prompts -> 2 calls of one compiled shape; the
    # same call with the same seed gives the same images.
    alone = run.text_to_image(["a small blue square"])
    np.testing.assert_array_equal(alone[0], run.text_to_image(["a small blue square"])[0])
    captions = run.caption(images[:3])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    recon = run.reconstruct(images[:2])
    assert recon.shape == (2, size, size, 3) and recon.dtype == np.uint8
    chain = run.interleave("a small blue square", rounds=2)
    assert len(chain) == 2 and chain[0]["image"].shape == (size, size, 3)
    assert all(isinstance(step["caption"], str) for step in chain)
    # Overrides change the sampler, not the run: a different cfg_scale gives another program.
    assert run.text_to_image(["a small blue square"], cfg_scale=1.0, ode_steps=2,
                             temperature=0.5).shape == (1, size, size, 3)


def test_same_images_as_the_sample_stage_path(run):
    ids, lengths = run.encode_prompts(["a small green triangle"])
    tokens = run.image_tokens_for(ids, lengths, seed=3)
    np.testing.assert_array_equal(run.pixels(tokens),
                                  run.pixels(run.image_tokens_for(ids, lengths, seed=3)))


def test_bad_input_is_one_clear_sentence(run):
    with pytest.raises(ValueError, match="non-empty list of strings"):
        run.text_to_image([])
    with pytest.raises(ValueError, match="max_caption_len"):
        run.text_to_image(["a large red circle " * 40])
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 3\]"):
        run.caption(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        run.reconstruct(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="one uint8 array"):
        run.caption([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    # Input that once generated silently from something else than what was asked:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        run.text_to_image(["a small blue square", "  "])
    with pytest.raises(ValueError, match=r"prompt 0 holds pieces .* cannot encode \(.*'42'"):
        run.text_to_image(["a small blue square 42"])
    with pytest.raises(ValueError, match=r"sampling override config\.sample\.ode_steps=0"):
        run.text_to_image(["a small blue square"], ode_steps=0)
    with pytest.raises(ValueError, match=r"config\.sample\.temperature=-1"):
        run.caption(np.zeros((1, 32, 32, 3), np.uint8), temperature=-1)
    with pytest.raises(ValueError, match=r"rounds='2' must be an integer >= 1"):
        run.interleave("a small blue square", rounds="2")


def test_load_a_given_step_and_a_missing_one(workdir, run):
    import mmjax
    again = mmjax.load(workdir, step=run.step)
    assert again.step == run.step
    with pytest.raises(ValueError, match="no checkpoint for step 999"):
        mmjax.load(workdir, step=999)
    with pytest.raises(ValueError, match=r"step='last' must be an integer checkpoint step"):
        mmjax.load(workdir, step="last")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        mmjax.load(os.path.join(workdir, "nowhere"))


def test_load_falls_back_from_an_unreadable_newest_checkpoint(workdir, tmp_path):
    """A run killed while saving leaves a newest step whose config and state cannot be read;
    load takes the previous one (as the trainer's resume does) instead of a raw orbax error."""
    import shutil
    import mmjax
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    ckpts = os.path.join(copy, "model", "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert len(steps) >= 2
    newest = os.path.join(ckpts, str(steps[-1]))
    with open(os.path.join(newest, "config", "metadata"), "w") as f:
        f.write("{not json")
    with open(os.path.join(newest, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"\0" * 16)
    assert mmjax.load(copy).step == steps[-2]


def test_sampling_reads_the_average_unless_told_otherwise(workdir, run):
    """A run that kept an EMA (train.ema_decay > 0) samples and scores it by default; the
    sample stage records which weights it scored; sample.weights='raw' reads the last iterate."""
    import json

    import jax

    import mmjax
    config = run.config.copy_and_resolve_references()
    config.sample.weights = "raw"
    raw = mmjax.load(workdir, config=config)
    averaged = [np.asarray(x) for x in jax.tree.leaves(run.params)]
    last = [np.asarray(x) for x in jax.tree.leaves(raw.params)]
    assert [a.shape for a in averaged] == [b.shape for b in last]
    assert any(not np.array_equal(a, b) for a, b in zip(averaged, last))
    with open(os.path.join(workdir, "samples", "eval.json")) as f:
        assert json.load(f)["params"] == "ema_params"


def test_training_metrics_count_real_tokens_and_periodic_samples(workdir, run):
    """The model stage logged tokens/s (real tokens), TFLOP/s per device and MFU (null on CPU),
    and its periodic sampler turns live params into TensorBoard images, text and accuracies."""
    import json

    from mmjax import stages
    from mmjax.workdir import Workdir
    with open(os.path.join(workdir, "model", "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "tokens_per_sec" in line]
    assert rows and all(r["tokens_per_sec"] > 0 and r["tflops_per_device"] > 0 for r in rows)
    assert all(r["mfu"] is None for r in rows)  # CPU: no known peak
    assert os.path.exists(os.path.join(workdir, "model", "config.json"))
    observe = stages.model.PeriodicSamples(run.config, Workdir.from_config(run.config, workdir),
                                           num=4)
    report = observe(run.params, run.step)
    grid = report["images"]["samples/text_to_image (top: true)"]
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[-1] == 3
    assert "periodic_t2i_prompt_acc" in report["scalars"]
    assert len(report["text"]["samples/image_to_caption"].split("\n\n")) == 4


def test_sample_settings_bench_scores_as_the_sample_stage(workdir, run):
    """bench.sample_settings' reference setting reproduces the sample stage's text->image scores
    (same prompts, seed and weights); another setting is scored on the same checkpoint with its
    paired difference; an unknown field is named in one line."""
    import json

    from absl import app

    from bench import sample_settings
    results = sample_settings.compare([workdir], [("default", {}), ("cfg1", {"cfg_scale": 1})],
                                      "test", 8, 0)
    with open(os.path.join(workdir, "samples", "eval.json")) as f:
        stage = json.load(f)["metrics"]
    default, cfg1 = results["rows"]
    for key in sample_settings.SCORES:
        assert default[key] == pytest.approx(stage[f"t2i_{key}"])
        assert default[f"{key}_lo"] <= default[key] <= default[f"{key}_hi"]
    assert default["prompts"] == cfg1["prompts"] == stage["num_eval"] == 8
    summary = results["summary"]["cfg1"]["prompt_acc"]
    assert summary["paired_diff_points"] == [round(100 * (cfg1["prompt_acc"]
                                                          - default["prompt_acc"]), 2)]
    with pytest.raises(app.UsageError, match="no sample field 'cfgscale'"):
        sample_settings.settings_for(run, "typo", {"cfgscale": 1.5})
    with pytest.raises(app.UsageError, match="NAME:FIELD=VALUE"):
        sample_settings.parse_setting("cfg_scale=1.5")


def test_step_time_bench_times_the_runs_own_rows(workdir, run, tmp_path):
    """bench.step_time --rows_from times the packed train rows the model stage trained on (their
    padding, not the synthetic captions'), and a block past the train set is one clear error."""
    import json

    from bench.train_harness import workdir_rows
    batch, vocab = workdir_rows(run.config, workdir, 4, block=1)
    assert vocab == run.tokenizer.vocab_size
    assert batch["tokens"].shape == (4, run.config.model.max_seq_len)
    real = float(np.mean(batch["segment_ids"] > 0))
    assert 0 < real < 1  # the smoke rows hold padding
    with pytest.raises(ValueError, match="packed train rows, fewer than block"):
        workdir_rows(run.config, workdir, 4, block=10**6)
    out = tmp_path / "step_time.json"
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "bench.step_time", "--sizes=smoke",
                          f"--rows_from={workdir}", "--batch_size=4", "--steps=1", "--warmup=1",
                          "--packings=fixed,first_fit", f"--out={out}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    row, first_fit = json.loads(out.read_text())["runs"]
    first, _ = workdir_rows(run.config, workdir, 4, block=0)
    assert row["rows"] == f"packed train rows of {workdir}" and row["packing"] == "fixed"
    assert row["real_fraction"] == pytest.approx(float(np.mean(first["segment_ids"] > 0)))
    assert first_fit["packing"] == "first_fit" and "step_s_first_fit_targets_over_fixed_targets" in row
    config = run.config.copy_and_resolve_references()
    config.data.packing = "first_fit"
    planned, _ = workdir_rows(config, workdir, 4, block=0)
    assert first_fit["real_fraction"] == pytest.approx(float(np.mean(planned["segment_ids"] > 0)))
