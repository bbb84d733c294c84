"""`python -m bench.fsq_vs_vq` end to end at a toy budget: both quantizers train from fresh
workdirs, rows carry usage at every token multiple (validation and train), the curve and the plot."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fsq_vs_vq_writes_rows_with_usage_at_token_multiples(tmp_path):
    out = tmp_path / "fsq_vs_vq.json"
    cmd = [sys.executable, "-m", "bench.fsq_vs_vq", "--log2_sizes=8", "--steps=2", "--score_every=1",
           "--num_train=64", "--min_eval_images=8", "--usage_multiples=1,20",
           f"--root={tmp_path / 'runs'}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert (tmp_path / "fsq_vs_vq.png").stat().st_size > 0
    assert results["data"]["usage_multiples"] == [1, 20]
    rows = {r["quantizer"]: r for r in results["rows"]}
    assert set(rows) == {"fsq", "vq"}
    k = math.prod((8, 6, 5))
    for row in rows.values():
        assert row["codebook_size"] == k and row["steps"] == 2
        assert row["tokens_counted"] >= 10 * k
        assert [c["step"] for c in row["curve"]] == [1, 2]
        at = row["usage_at_multiples"]
        assert set(at) == {"1", "20"} and 0 < at["1"] <= at["20"] <= 1  # usage only grows with tokens
        # 64 train crops x 64 tokens hold 1 x K tokens but not 20 x K: null, not a smaller count
        assert row["train_usage_at_multiples"]["20"] is None
        assert 0 < row["train_usage_at_multiples"]["1"] <= 1
