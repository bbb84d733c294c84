"""Tokenizer train steps/s and images/s by conv widths, batch size and patch size, on this host's CPU.

  python -m bench.tokenizer_width                      # demo: 32 vs 16 full-res channels, batch 16
  python -m bench.tokenizer_width --variants=32,64,64,64:32 --variants=16,64,64,64:32 --rounds=3
  python -m bench.tokenizer_width --variants=16,64,64,64:16 --variants=32,64,64:16:2  # patchify

Why: XLA CPU runs the backward pass of a 3x3 convolution at a fraction of its forward rate, so the
tokenizer's full-resolution level (32x32 pixels) costs far more of a step than its FLOPs share;
narrowing that level is what let the demo train its tokenizer 1.5x longer in the same time
(configs/mot_shapes.py), and folding 2x2 pixels into channels (`fsq.patch_size=2`) removes it.
Each measurement is its own `--mode=tokenizer` process from a fresh workdir
(bench.common.run_stage), the variants alternate within each round so that load drifting on the
host hits them alike, and steps/s leaves out the first logged interval (the compile).
Writes bench/results/tokenizer_width.json.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys

from absl import app, flags

from bench.common import run_stage, stage_steps_per_sec, write_results

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/mot_shapes.py:demo", "Config the tokenizer runs with.")
flags.DEFINE_multi_string("variants", ["32,64,64,64:16", "16,64,64,64:16"],
                          "CHANNELS:BATCH[:PATCH], e.g. 16,64,64,64:16 or 32,64,64:16:2 "
                          "(fsq.channels, tokenizer batch, fsq.patch_size; default 1).")
flags.DEFINE_integer("rounds", 2, "Alternating rounds over --variants.")
flags.DEFINE_integer("steps", 240, "Tokenizer steps per measurement.")
flags.DEFINE_string("workdir", "/tmp/mmjax_bench_tokenizer_width", "Root of the runs' workdirs.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/tokenizer_width.json).")

LOG_EVERY = 40


def parse_variant(spec: str) -> tuple[tuple[int, ...], int, int]:
    """'16,64,64,64:16' -> ((16, 64, 64, 64), 16, 1), '32,64,64:16:2' -> (..., 16, 2); a usage
    error naming the flag otherwise."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return (tuple(int(c) for c in parts[0].split(",")), int(parts[1]),
                int(parts[2]) if len(parts) == 3 else 1)
    except ValueError:
        raise app.UsageError(f"--variants={spec!r}: expected CHANNELS:BATCH[:PATCH], e.g. "
                             "16,64,64,64:16 or 32,64,64:16:2")


def variant_name(channels: tuple[int, ...], batch: int, patch: int = 1) -> str:
    """'16-64-64-64_b16' ('32-64-64_b16_p2' with a patch size): the variant's workdir and the
    name its ratio is keyed by."""
    return f"{'-'.join(map(str, channels))}_b{batch}" + (f"_p{patch}" if patch > 1 else "")


def measure(channels: tuple[int, ...], batch: int, patch: int, data: str, root: str) -> float:
    """Steady tokenizer steps/s of one fresh run of the variant."""
    workdir = os.path.join(root, variant_name(channels, batch, patch))
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(data, os.path.join(workdir, "data"))
    run_stage(FLAGS.config, workdir, "tokenizer", f"--config.fsq.channels={channels}",
              f"--config.fsq.patch_size={patch}",
              f"--config.tokenizer_train.batch_size={batch}",
              f"--config.tokenizer_train.steps={FLAGS.steps}",
              f"--config.tokenizer_train.log_every={LOG_EVERY}",
              f"--config.tokenizer_train.checkpoint_every={FLAGS.steps}")
    return stage_steps_per_sec(os.path.join(workdir, "tokenizer"))


def main(_):
    variants = [parse_variant(v) for v in FLAGS.variants]
    base = os.path.join(FLAGS.workdir, "base")
    if not os.path.isdir(os.path.join(base, "data")):
        run_stage(FLAGS.config, base, "data")
    rates = {v: [] for v in variants}
    for _ in range(FLAGS.rounds):
        for variant in variants:
            rates[variant].append(measure(*variant, os.path.join(base, "data"), FLAGS.workdir))
            print(f"{variant_name(*variant)}: {rates[variant][-1]:.2f} steps/s", flush=True)
    first = variants[0]
    rows = []
    for (channels, batch, patch), per_round in rates.items():
        images = [r * batch for r in per_round]
        rows.append({"channels": list(channels), "batch_size": batch, "patch_size": patch,
                     "steps_per_sec": statistics.mean(per_round), "per_round": per_round,
                     "images_per_sec": statistics.mean(images),
                     f"images_per_sec_vs_{variant_name(*first)}":
                         statistics.mean(i / (f * first[1]) for i, f in zip(images, rates[first]))})
    write_results("tokenizer_width", {
        "config": FLAGS.config, "rounds": FLAGS.rounds, "steps": FLAGS.steps, "runs": rows,
        "command": "python -m bench.tokenizer_width " + " ".join(sys.argv[1:])}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
