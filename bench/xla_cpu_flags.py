"""The demo's trained stages under XLA CPU backend flags that route dots or convolutions to a
library (XNNPACK, YNNPACK, oneDNN) or widen vectors, alternating in fresh `mmjax` processes.

  python -m bench.xla_cpu_flags                                   # demo, 2 rounds, both stages
  python -m bench.xla_cpu_flags --base=DEMO_WORKDIR --settings=default,ynn_conv --stages=tokenizer

Why: the demo is a CPU job, and XLA's CPU compiler emits its own loops for dots and calls Eigen
for convolutions unless told otherwise; these flags are the cheapest speed-up there could be (no
model change), so they are measured before anything is built by hand. XLA_FLAGS is read once,
when JAX starts, so each measurement is its own process, the settings alternate within each
round, and the caller's XLA_FLAGS reaches none of them. --base reuses a finished demo's data,
tokenizer and image tokens; without it a short tokenizer is built. Writes
bench/results/xla_cpu_flags.json: steps/s after the compile per setting and round, and each
setting's speed over `default` per round.
"""
from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

from bench.common import STAGE_INPUTS, alternating_runs, round_summary, stage_base, write_results

FUSION_FLAG = "--xla_cpu_experimental_{}_fusion_type=LIBRARY_FUSION_TYPE_{}"
SETTINGS = {  # name: XLA_FLAGS (flag names and values as jaxlib 0.10's XLA spells them)
    "default": "",
    "xnn_dot": FUSION_FLAG.format("xnn", "DOT"),
    "ynn_dot": FUSION_FLAG.format("ynn", "DOT"),
    "onednn_dot": FUSION_FLAG.format("onednn", "DOT"),
    "xnn_conv": FUSION_FLAG.format("xnn", "INDIVIDUAL_CONVOLUTION"),
    "ynn_conv": FUSION_FLAG.format("ynn", "INDIVIDUAL_CONVOLUTION"),
    "vector512": "--xla_cpu_prefer_vector_width=512",
}

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/mot_shapes.py:demo", "Config the stages run with.")
flags.DEFINE_string("base", None, "A workdir holding finished data/, tokenizer/, image_tokens/.")
flags.DEFINE_list("stages", ["tokenizer", "model"], "Stages to time.")
flags.DEFINE_list("settings", list(SETTINGS), f"Settings to time, the first being the baseline: "
                  f"{', '.join(SETTINGS)}.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds over the settings.")
flags.DEFINE_integer("tokenizer_steps", 200, "Tokenizer steps per measurement.")
flags.DEFINE_integer("model_steps", 250, "Model steps per measurement.")
flags.DEFINE_string("workdir", "/tmp/mmjax_bench_xla_cpu_flags", "Root of the runs' workdirs.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/xla_cpu_flags.json).")


def main(_):
    if not set(FLAGS.stages) <= set(STAGE_INPUTS):
        raise app.UsageError(f"--stages must be among {sorted(STAGE_INPUTS)}, got {FLAGS.stages}")
    unknown = set(FLAGS.settings) - set(SETTINGS)
    if unknown:
        raise app.UsageError(f"--settings: unknown {sorted(unknown)}; choose from {list(SETTINGS)}")
    os.environ.pop("XLA_FLAGS", None)  # each child gets its setting's flags and nothing else
    base = stage_base(FLAGS.config, FLAGS.base, FLAGS.workdir)
    steps = {"tokenizer": FLAGS.tokenizer_steps, "model": FLAGS.model_steps}
    chosen = {name: SETTINGS[name] for name in FLAGS.settings}
    results = {"config": FLAGS.config, "rounds": FLAGS.rounds, "steps": steps,
               "xla_flags": chosen, "cpu_flags": cpu_flags(),
               "command": "python -m bench.xla_cpu_flags " + " ".join(sys.argv[1:])}
    first = FLAGS.settings[0]
    for stage in FLAGS.stages:
        by_setting = alternating_runs(FLAGS.config, base, FLAGS.workdir, stage, steps[stage],
                                      {name: () for name in chosen}, FLAGS.rounds,
                                      envs={name: {"XLA_FLAGS": f} for name, f in chosen.items()})
        results[stage] = {name: round_summary(runs) for name, runs in by_setting.items()}
        for name, runs in by_setting.items():
            per_round = [r["steps_per_sec"] / b["steps_per_sec"]
                         for r, b in zip(runs, by_setting[first])]
            results[stage][name][f"over_{first}_per_round"] = per_round
            results[stage][name][f"over_{first}"] = statistics.mean(per_round)
    write_results("xla_cpu_flags", results, FLAGS.out)


def cpu_flags() -> list[str]:
    """The host's vector extensions (what the library paths can use), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(l for l in f if l.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(w for w in line.split(":", 1)[1].split() if w.startswith(("avx", "fma", "amx")))


if __name__ == "__main__":
    app.run(main)
