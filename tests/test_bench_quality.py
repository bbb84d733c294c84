"""`python -m bench.quality` end to end at the smoke size on grid4: the flow head reads grid4
tokens and the discrete head grid8 ones, so each gets its own base build (data, tokenizer,
image tokens) and its own ceiling; the points train from fresh workdirs and sample on their
tokenizer's grid."""
import json
import os
import subprocess
import sys

import pytest
from child_env import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quality_builds_one_base_per_tokenizer_and_scores_both_heads(tmp_path):
    import jax
    import numpy as np

    from mmjax import api
    from mmjax.tokenizers.fsq import FSQ
    out = tmp_path / "quality.json"
    env = child_env()
    env.update(JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--spec=smoke,grid4", "--multipliers=1",
         "--heads=flow,discrete", "--set=sample.num_eval=4", "--set=sample.batch_size=4",
         "--set=sample.interleaved_rounds=0", f"--root={tmp_path / 'runs'}", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    bases = results["bases"]
    assert bases["flow"] != bases["discrete"]
    sizes = {head: json.loads(open(os.path.join(base, "tokenizer", "eval_validation.json")).read())
             ["codebook_size"] for head, base in bases.items()}
    assert sizes == {"flow": 2**24, "discrete": 1000}
    assert [(r["head"], r["steps"]) for r in results["rows"]] == [("flow", 3), ("discrete", 3)]
    assert all(0 <= r["t2i_prompt_acc"] <= 1 and "recon_prompt_acc" in r for r in results["rows"])
    assert os.path.exists(tmp_path / "quality.png")
    # the flow point samples 16 tokens per image on the 2^24-code grid (no table, no histogram)
    run = api.load(os.path.join(results["root"], "flow_x1"))
    sampled = run.sampler(run.settings).text_to_image(
        run.params, *run.encode_prompts(["a red circle"]), jax.random.PRNGKey(0))
    indices, codes = np.asarray(sampled["indices"][0]), np.asarray(sampled["codes"][0])
    assert indices.shape == (16,)
    np.testing.assert_array_equal(codes, FSQ((8,) * 8).indices_to_codes(indices))
