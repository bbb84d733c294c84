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
import statistics
import sys

from absl import app, flags

from bench.common import (STAGE_INPUTS, build_stage_inputs, stage_inputs_ready, timed_stage,
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

SETTINGS = {"4k_pages": False, "huge_pages": True}  # name: mesh.malloc_hugepages


def summary(runs: list[dict]) -> dict:
    """Means over the rounds, with the per-round values."""
    keys = runs[0].keys()
    return {**{k: statistics.mean(r[k] for r in runs) for k in keys},
            "per_round": {k: [r[k] for r in runs] for k in keys}}


def main(_):
    if not set(FLAGS.stages) <= set(STAGE_INPUTS):
        raise app.UsageError(f"--stages must be among {sorted(STAGE_INPUTS)}, got {FLAGS.stages}")
    os.environ.pop(host_malloc.ENV, None)  # the children get only what their config asks for
    base = FLAGS.base or os.path.join(FLAGS.workdir, "base")
    if FLAGS.base and not stage_inputs_ready(base):
        raise app.UsageError(f"--base={base} lacks one of {STAGE_INPUTS['model']}")
    build_stage_inputs(FLAGS.config, base)
    steps = {"tokenizer": FLAGS.tokenizer_steps, "model": FLAGS.model_steps}
    runs = {stage: {name: [] for name in SETTINGS} for stage in FLAGS.stages}
    for _ in range(FLAGS.rounds):
        for stage in FLAGS.stages:
            for name, on in SETTINGS.items():
                run = timed_stage(FLAGS.config, base, os.path.join(FLAGS.workdir, f"{stage}_{name}"),
                                  stage, steps[stage], f"--config.mesh.malloc_hugepages={on}")
                run["minor_faults_per_step"] = run["minor_faults"] / steps[stage]
                runs[stage][name].append(run)
                print(f"{stage} {name}: {run['steps_per_sec']:.2f} steps/s, "
                      f"{run['minor_faults_per_step']:.0f} faults/step, user {run['user_s']:.0f} s, "
                      f"system {run['system_s']:.0f} s", flush=True)
    results = {"config": FLAGS.config, "rounds": FLAGS.rounds, "steps": steps,
               "command": "python -m bench.host_malloc " + " ".join(sys.argv[1:]),
               "thp_mode": host_malloc.thp_mode(),
               "glibc": ".".join(map(str, host_malloc.glibc_version() or ())) or None}
    for stage, by_setting in runs.items():
        results[stage] = {name: summary(r) for name, r in by_setting.items()}
        plain, huge = (results[stage][n]["steps_per_sec"] for n in SETTINGS)
        results[stage]["speedup"] = huge / plain
        results[stage]["speedup_per_round"] = [
            h["steps_per_sec"] / p["steps_per_sec"]
            for p, h in zip(*(by_setting[n] for n in SETTINGS))]
    write_results("host_malloc", results, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
