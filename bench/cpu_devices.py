"""Train steps/s of the demo's two trained stages with the CPU host split into 1, 2, 4 devices.

  python -m bench.cpu_devices                        # demo, counts 1,2,4, 2 rounds
  python -m bench.cpu_devices --counts=1,2 --rounds=3 --config=configs/mot_shapes.py:cpu_hour

Why: one XLA CPU device spreads each op over the cores with its intra-op thread pool; the FSQ
tokenizer's small convolutions use a second core poorly that way, data parallel over one device
per core does better (mesh.cpu_devices, mmjax.parallel.split_cpu_host). The device count is fixed
per process, so every measurement is its own `mmjax --mode=tokenizer|model` process, and the
counts alternate within each round so that load drifting on the host hits them alike.
steps/s is read from the stage's train_metrics.jsonl, leaving out the first logged interval (it
holds the compile). Data, a short tokenizer and its image tokens are built once in --workdir:
the model's step time does not depend on the tokenizer's quality.
Writes bench/results/cpu_devices.json.
"""
from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

from bench.common import stage_base, timed_stage, write_results

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/mot_shapes.py:demo", "Config the stages run with.")
flags.DEFINE_list("counts", ["1", "2", "4"], "mesh.cpu_devices values to compare.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds over --counts.")
flags.DEFINE_integer("tokenizer_steps", 300, "Tokenizer steps per measurement.")
flags.DEFINE_integer("model_steps", 400, "Model steps per measurement.")
flags.DEFINE_string("workdir", "/tmp/mmjax_bench_cpu_devices", "Root of the runs' workdirs.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/cpu_devices.json).")

def measure(stage: str, count: int, base: str, root: str) -> float:
    steps = FLAGS.tokenizer_steps if stage == "tokenizer" else FLAGS.model_steps
    return timed_stage(FLAGS.config, base, os.path.join(root, f"{stage}_{count}"), stage, steps,
                       f"--config.mesh.cpu_devices={count}")["steps_per_sec"]


def main(_):
    counts = [int(c) for c in FLAGS.counts]
    if not counts or min(counts) < 1:
        raise app.UsageError(f"--counts must be positive integers, got {FLAGS.counts}")
    root = FLAGS.workdir
    base = stage_base(FLAGS.config, None, root)
    runs = {stage: {c: [] for c in counts} for stage in ("tokenizer", "model")}
    for _ in range(FLAGS.rounds):
        for stage in runs:
            for count in counts:
                runs[stage][count].append(measure(stage, count, base, root))
                print(f"{stage} cpu_devices={count}: {runs[stage][count][-1]:.2f} steps/s",
                      flush=True)
    results = {"config": FLAGS.config, "rounds": FLAGS.rounds,
               "steps": {"tokenizer": FLAGS.tokenizer_steps, "model": FLAGS.model_steps},
               "command": "python -m bench.cpu_devices " + " ".join(sys.argv[1:])}
    for stage, by_count in runs.items():
        one = statistics.mean(by_count[counts[0]])
        results[stage] = {str(c): {"steps_per_sec": statistics.mean(v), "per_round": v,
                                   f"speedup_vs_{counts[0]}": statistics.mean(v) / one}
                          for c, v in by_count.items()}
    write_results("cpu_devices", results, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
