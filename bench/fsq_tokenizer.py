"""FSQ tokenizer figures: validation PSNR, codebook usage, perplexity and steps/s per budget.

  python -m bench.fsq_tokenizer --runs=demo:8,5,5,5 --runs=long:8,5,5,5 --runs=demo:8,8,8,5,5,5

Each run is a normal `--mode=tokenizer` run of configs/fsq_shapes.py:<budget> in its own workdir
(always trained from a fresh one: a resumed stage would time only its eval). Writes
bench/results/fsq_tokenizer.json.
"""
from __future__ import annotations

import os
import shutil
import time

from absl import app, flags

from bench.common import load_config, steady_rates, write_results
from mmjax import stages

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("runs", ["demo:8,5,5,5", "demo:8,8,8,5,5,5"], "budget:levels")
flags.DEFINE_string("workdir", "/tmp/mmjax_bench_fsq", "Root of the runs' workdirs.")
flags.DEFINE_integer("steps", 0, "Override the budget's training steps (0: keep), e.g. a longer "
                     "run of the demo budget: --runs=demo:8,5,5,5 --steps=2400.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/fsq_tokenizer.json).")


def run_one(budget: str, levels: tuple[int, ...], root: str) -> dict:
    config = load_config(f"configs/fsq_shapes.py:{budget}")
    config.fsq.levels = levels
    config.tokenizer_train.progress_bar = False
    name = f"{budget}_{'-'.join(map(str, levels))}"
    if FLAGS.steps:
        config.tokenizer_train.steps = FLAGS.steps
        name += f"_{FLAGS.steps}steps"
    workdir = os.path.join(root, name)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: a resumed stage would time an eval
    start = time.perf_counter()
    results = stages.run_mode(config, workdir, "tokenizer")
    wall = time.perf_counter() - start
    steady = steady_rates(os.path.join(workdir, "tokenizer"))  # after the compile's window
    metrics = results["tokenizer"]
    return {"budget": budget, "levels": list(levels), "codebook_size": metrics["codebook_size"],
            "steps": metrics["step"], "batch_size": config.tokenizer_train.batch_size,
            "val_psnr_db": metrics["validation_psnr"],
            "codebook_usage": metrics["validation_usage"],
            "code_perplexity": metrics["validation_perplexity"],
            "steps_per_sec": sum(steady) / len(steady), "wall_s": wall}


def main(_):
    out = []
    for spec in FLAGS.runs:
        budget, _, levels = spec.partition(":")
        try:
            parsed = tuple(int(v) for v in levels.split(","))
        except ValueError:
            raise app.UsageError(f"--runs={spec!r}: expected BUDGET:L1,L2,... e.g. demo:8,5,5,5")
        out.append(run_one(budget, parsed, FLAGS.workdir))
        print(out[-1])
    write_results("fsq_tokenizer", {"runs": out}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
