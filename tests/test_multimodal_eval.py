"""The sample/eval stage at the end of a full smoke pipeline (configs/mot_shapes.py:smoke): files
are written, metrics are in range and consistent with eval.json, the shapes rule checker really
scores the generated, reconstructed and true images (true images score 1.0), captions are
parsed, and validation perplexity / image loss are finite."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from child_env import child_env

from bench.common import load_config
from mmjax.evals import text_metrics

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

NUM_EVAL = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs in a fresh process with ONE CPU device (as the CLI does; conftest's 8 simulated devices
# would make the smoke batches indivisible and every compile slower). It spies on the rule
# checker and saves what it was given next to the metrics.
WORKER = """
import json, sys
import numpy as np
from bench.common import load_config
from mmjax import main
from mmjax.evals import shapes_checker


workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
config = load_config("configs/mot_shapes.py:smoke")
for key, value in overrides.items():
    config.sample[key] = value
calls, original = [], shapes_checker.score_batch

def spy(images, attributes):
    calls.append((np.asarray(images).copy(), np.asarray(attributes).copy()))
    return original(images, attributes)

shapes_checker.score_batch = spy
results = main.run(config, workdir, "pipeline")
np.savez(f"{workdir}/checker_calls.npz", **{f"{name}{i}": arr for i, call in enumerate(calls)
                                            for name, arr in zip(("images", "attributes"), call)})
with open(f"{workdir}/test_metrics.json", "w") as f:
    json.dump(results["sample"], f)
"""
# Fewer prompts than the smoke default (same code, less time); batches of 3 leave a padded last
# batch.
OVERRIDES = {"num_eval": NUM_EVAL, "batch_size": 3, "interleaved_rounds": 1}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mm_eval"))
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WORKER, workdir, json.dumps(OVERRIDES)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(workdir, "test_metrics.json")) as f:
        metrics = json.load(f)
    with np.load(os.path.join(workdir, "checker_calls.npz")) as z:
        calls = [(z[f"images{i}"], z[f"attributes{i}"]) for i in range(len(z.files) // 2)]
    config = load_config("configs/mot_shapes.py:smoke")
    config.sample.update(OVERRIDES)
    return dict(workdir=workdir, config=config, metrics=metrics, calls=calls)


def test_files_are_written(pipeline):
    out = os.path.join(pipeline["workdir"], "samples")
    for name in ("text_to_image.png", "image_to_text.png", "interleaved.png"):
        with Image.open(os.path.join(out, name)) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    with open(os.path.join(out, "eval.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == pytest.approx(pipeline["metrics"])
    assert saved["dataset"] == "shapes" and saved["sample"]["num_eval"] == NUM_EVAL
    with open(os.path.join(out, "captions.txt")) as f:
        lines = f.read().splitlines()
    pairs = [ln for ln in lines if ln.count(" | ") == 2 and not ln.startswith("#")]
    assert len(pairs) == NUM_EVAL
    chains = [ln for ln in lines if " -> " in ln and not ln.startswith("#")]
    assert len(chains) == pipeline["config"].sample.num_samples


def test_rule_checker_scores_generated_recon_and_true_images(pipeline):
    calls, m = pipeline["calls"], pipeline["metrics"]
    assert len(calls) == 3  # generated, FSQ reconstructions, ground truth
    size = pipeline["config"].data.image_size
    for images, attributes in calls:
        assert images.shape == (NUM_EVAL, size, size, 3) and images.dtype == np.uint8
        assert attributes.shape == (NUM_EVAL, pipeline["config"].data.max_objects, 5)
    generated, recon, truth = (c[0] for c in calls)
    assert not np.array_equal(generated, truth) and not np.array_equal(recon, truth)
    # The checker reads the true images perfectly: it is wired to the right attributes.
    assert m["gt_prompt_acc"] == 1.0 and m["gt_object_acc"] == 1.0
    for prefix in ("t2i", "recon", "gt"):
        for name in ("shape", "color", "size", "position", "object", "count", "prompt"):
            assert 0.0 <= m[f"{prefix}_{name}_acc"] <= 1.0


def test_caption_and_loss_metrics_are_in_range(pipeline):
    m = pipeline["metrics"]
    assert m["step"] == pipeline["config"].train.steps and m["num_eval"] == NUM_EVAL
    for name in ("shape", "color", "size", "position", "object", "count", "exact"):
        assert 0.0 <= m[f"i2t_{name}_acc"] <= 1.0
    assert 0.0 <= m["i2t_parse_rate"] <= 1.0
    assert 1.0 < m["val_caption_ppl"] < 1e4 and math.isclose(
        math.log(m["val_caption_ppl"]), m["val_caption_nll"], rel_tol=1e-6)
    assert 0.0 < m["val_t2i_image_loss"] < 100.0
    assert m["t2i_seconds"] > 0 and m["i2t_seconds"] > 0


def test_text_metrics_units():
    scores = text_metrics.digit_caption_accuracy(
        ["a handwritten digit seven", "a handwritten digit one", "garbage"], [7, 2, 3])
    assert {k: scores[k] for k in ("digit_acc", "parse_rate")} == {
        "digit_acc": 1 / 3, "parse_rate": 2 / 3}
    assert scores["digit_acc_lo"] < 1 / 3 < scores["digit_acc_hi"] and scores["digit_acc_n"] == 3
    mask = text_metrics.caption_only_mask(np.ones((1, 4)), np.array([[4, 9, 5, 3]]), (4, 5))
    assert mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="labels"):
        text_metrics.digit_caption_accuracy(["a handwritten digit one"], [])
