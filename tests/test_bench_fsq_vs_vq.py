"""`python -m bench.fsq_vs_vq` end to end at a toy budget: both quantizers train from fresh
workdirs, rows carry usage at every token multiple (validation and train), the curve and the plot;
a sweep split over two invocations run side by side and joined (--rows_from) makes the same
table, and rows run at other settings, or held twice, are refused."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(tmp_path, *args):
    cmd = [sys.executable, "-m", "bench.fsq_vs_vq", "--log2_sizes=8", "--steps=2", "--num_train=64",
           "--min_eval_images=8", "--usage_multiples=1,20", f"--root={tmp_path / 'runs'}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsq_vs_vq_writes_rows_with_usage_at_token_multiples(tmp_path):
    first, out = tmp_path / "fsq.json", tmp_path / "fsq_vs_vq.json"
    proc = bench(tmp_path, "--quantizers=fsq", "--score_every=1", f"--out={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = tmp_path / "vq.json"  # run beside the first; joined below
    proc = bench(tmp_path, "--quantizers=vq", "--score_every=1", f"--out={second}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = bench(tmp_path, "--quantizers=", f"--rows_from={first},{second}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for args, says in ((["--quantizers=vq", "--steps=3"], "row fsq 2^8 has steps=2, this run 3"),
                       (["--quantizers=fsq"], "holds fsq 2^8 already"),
                       (["--quantizers=vq", "--usage_multiples=1"], "data.usage_multiples"),
                       (["--quantizers=", f"--rows_from={first},{first}"], "holds fsq 2^8 already"),
                       (["--quantizers=", "--rows_from="], "needs --rows_from")):
        proc = bench(tmp_path, f"--rows_from={first}", *args, f"--out={tmp_path / 'no.json'}")
        assert proc.returncode != 0 and says in proc.stderr
        assert not (tmp_path / "no.json").exists()  # refused before anything trained
    results = json.loads(out.read_text())
    assert (tmp_path / "fsq_vs_vq.png").stat().st_size > 0
    assert results["data"]["usage_multiples"] == [1, 20]
    assert [r["file"] for r in results["rows_from"]] == ["fsq.json", "vq.json"]
    rows = {r["quantizer"]: r for r in results["rows"]}
    assert [r["quantizer"] for r in results["rows"]] == ["fsq", "vq"]
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
