"""`configs/mot_shapes.py:smoke,edits` end to end (--mode=pipeline on a fresh workdir): data,
tokenizer, tokenize, model on edit documents, and the sample stage's edit eval in eval.json."""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("edits"))
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "mmjax.main", "--config=configs/mot_shapes.py:smoke,edits",
                          f"--workdir={wd}", "--mode=pipeline", "--config.sample.num_eval=6",
                          "--config.sample.batch_size=4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return wd


def test_edit_eval_is_written_with_intervals_and_ceilings(workdir):
    with open(os.path.join(workdir, "samples", "eval.json")) as f:
        record = json.load(f)
    m = record["metrics"]
    assert record["dataset"] == "shapes_edits" and m["num_eval"] == 6 and m["step"] == 3
    for prefix in ("", "recon_", "gt_", "copy_"):
        for name in ("edit_acc", "preserve_acc"):
            key = prefix + name
            assert 0 <= m[key + "_lo"] <= m[key] <= m[key + "_hi"] <= 1, key
    assert m["edit_acc_n"] == 6
    assert m["gt_edit_acc"] == 1.0 and m["gt_preserve_acc"] == 1.0  # the checker reads the truth
    assert m["copy_edit_acc"] == 0.0 and m["copy_preserve_acc"] == 1.0  # doing nothing edits nothing
    assert math.isfinite(m["val_edit_image_loss"]) and m["val_edit_image_loss"] > 0
    with Image.open(os.path.join(workdir, "samples", "edits.png")) as im:
        assert im.size[0] > 3 * 32
