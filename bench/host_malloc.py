"""The demo's trained stages with glibc malloc on 4 KiB pages against transparent huge pages
(mesh.malloc_hugepages, mmjax.host_malloc), alternating in fresh `mmjax` processes.

  python -m bench.host_malloc                          # demo, 2 rounds, both stages
  python -m bench.host_malloc --base=DEMO_WORKDIR --rounds=3 --stages=model

Why: XLA CPU maps each step's temp buffer afresh (69.6 MB per device in the demo's train step),
and with 4 KiB pages every step pays ~35,000 minor page faults in the kernel. The setting takes
effect only at process start, so each measurement is its own process, the two settings alternate
within each round (load drifting on the host hits both alike), and no GLIBC_TUNABLES of the
caller reaches them. Reported per run: steps/s after the compile, the process's user and system
CPU seconds and minor page faults. --base reuses a finished demo's data, tokenizer and image
tokens (the step time does not depend on their quality); without it a short tokenizer is built.
Writes bench/results/host_malloc.json.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from bench.common import (STAGE_INPUTS, alternating_runs, round_summary, stage_base,
                          write_results)
from mmjax import host_malloc

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/mot_shapes.py:demo", "Config the stages run with.")
flags.DEFINE_string("base", None, "A workdir holding finished data/, tokenizer/, image_tokens/.")
flags.DEFINE_list("stages", ["tokenizer", "model"], "Stages to time.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds over the two settings.")
flags.DEFINE_integer("tokenizer_steps", 300, "Tokenizer steps per measurement.")
flags.DEFINE_integer("model_steps", 300, "Model steps per measurement.")
flags.DEFINE_string("workdir", "/tmp/mmjax_bench_host_malloc", "Root of the runs' workdirs.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/host_malloc.json).")

SETTINGS = {name: (f"--config.mesh.malloc_hugepages={on}",)
            for name, on in (("4k_pages", False), ("huge_pages", True))}


def main(_):
    if not set(FLAGS.stages) <= set(STAGE_INPUTS):
        raise app.UsageError(f"--stages must be among {sorted(STAGE_INPUTS)}, got {FLAGS.stages}")
    os.environ.pop(host_malloc.ENV, None)  # the children get only what their config asks for
    base = stage_base(FLAGS.config, FLAGS.base, FLAGS.workdir)
    steps = {"tokenizer": FLAGS.tokenizer_steps, "model": FLAGS.model_steps}
    results = {"config": FLAGS.config, "rounds": FLAGS.rounds, "steps": steps,
               "command": "python -m bench.host_malloc " + " ".join(sys.argv[1:]),
               "thp_mode": host_malloc.thp_mode(),
               "glibc": ".".join(map(str, host_malloc.glibc_version() or ())) or None}
    for stage in FLAGS.stages:
        by_setting = alternating_runs(FLAGS.config, base, FLAGS.workdir, stage, steps[stage],
                                      SETTINGS, FLAGS.rounds)
        for run in (r for runs in by_setting.values() for r in runs):
            run["minor_faults_per_step"] = run["minor_faults"] / steps[stage]
        results[stage] = {name: round_summary(r) for name, r in by_setting.items()}
        plain, huge = (results[stage][n]["steps_per_sec"] for n in SETTINGS)
        results[stage]["speedup"] = huge / plain
        results[stage]["speedup_per_round"] = [
            h["steps_per_sec"] / p["steps_per_sec"]
            for p, h in zip(*(by_setting[n] for n in SETTINGS))]
    write_results("host_malloc", results, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
