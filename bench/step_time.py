"""Train step time, tokens/s, MFU and FLOPs executed vs counted vs model size (configs/mot_shapes.py).

  python -m bench.step_time --sizes=smoke,demo,small                 # CPU
  python -m bench.step_time --sizes=demo --rows_from=/tmp/mmjax_demo  # the demo's own rows
  python -m bench.step_time --sizes=demo --rows_from=/tmp/mmjax_demo --packings=fixed,first_fit
  python -m bench.step_time --sizes=base,300m,1b --batch_size=32     # accelerator (bf16, remat)

Synthetic packed batches (bench/train_harness.py), or with --rows_from=WORKDIR the packed train
rows of a finished run (its captions' own lengths, so its own padding), go through the trainer's
own jitted step (`train.build_setup`: AdamW, clipping, sharding from the rules table), compiled
ahead of time.

Primary figures count REAL tokens (padding excluded): real_tokens_per_s, model_tflops_per_s and
mfu = real tokens/s x counted FLOPs per token / (peak x devices), peak from --peak_tflops or the
device kind (none on CPU unless given). tokens_per_s_all_slots (padding included) stands beside.

FLOPs per step, three figures:
- flops_counted: `mmjax.flops.flops_per_token` (training = 3 x forward, causal-average attention,
  heads at their targets: image_fraction = image targets / real tokens, text_fraction = text
  targets / real tokens, measured on the batch) x real tokens in the batch. What the model needs.
- flops_executed: XLA's `compiled.cost_analysis()["flops"]` of the jitted train step (forward,
  backward, optimizer; what was compiled: padding, full attention, static head capacity).
- flops_at_slots: the same analytic counts applied to the shapes the step runs (every slot of
  the batch, non-causal attention as the einsum computes it, the heads at their capacity slots):
  it separates "XLA counts what we think we run" (executed / at_slots) from "what we run exceeds
  what is needed" (at_slots / counted: padding, causal half, capacity slack).
--heads=targets,rows,all runs each size with the heads at their target capacity (today's
objective: image slots per direction group), at one image per document of every row (before
direction groups) and at all positions, masked (`capacity=None`), timed in alternation in one
run, so the before/after ratios do not depend on load drifting; --packings=fixed,first_fit does
the same for two data.packing layouts of one workdir's data.
Writes bench/results/step_time.json (with the git commit).
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from absl import app, flags

from bench.common import load_config, write_results
from bench.train_harness import HEADS, TimedTrainStep, mesh_from_flag, summarize, \
    synthetic_rows, token_stats, workdir_rows
from mmjax import config_validation, flops

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["smoke", "demo", "small"], "configs/mot_shapes.py sizes.")
flags.DEFINE_string("options", "", "Extra config options, e.g. 'dense' or 'discrete,mot3'.")
flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's train.batch_size).")
flags.DEFINE_integer("steps", 5, "Timed steps per size and heads variant (after warmup).")
flags.DEFINE_integer("warmup", 2, "Untimed steps (the first follows the compile).")
flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes (-1: the rest).")
flags.DEFINE_string("dtype", "", "Override model.dtype (e.g. bfloat16); '' keeps the config's.")
flags.DEFINE_string("remat", "", "Override model.remat; '' keeps the config's.")
flags.DEFINE_string("mot_impl", "", "Override model.mot_impl; '' keeps the config's.")
flags.DEFINE_string("attention_impl", "", "Override model.attention_impl; '' keeps the config's.")
flags.DEFINE_list("heads", ["targets"], "Head variants per size, timed in alternation: targets "
                  "(heads at the packer's target capacity, image targets per direction group), "
                  "rows (one image per document of every row: the capacity before direction "
                  "groups) and/or all (every position, masked).")
flags.DEFINE_list("packings", [], "data.packing values to time side by side on rows of the same "
                  "data; empty: the config's.")
flags.DEFINE_string("rows_from", "", "A finished workdir of the sizes' config (e.g. the README "
                    "demo's): time its own packed train rows instead of synthetic ones, so "
                    "padding is the data's (train_harness.workdir_rows).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: from device kind).")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/step_time.json).")



def size_config(size: str):
    spec = ",".join([size] + [o for o in FLAGS.options.split(",") if o])
    config = load_config(f"configs/mot_shapes.py:{spec}")
    for field in ("dtype", "remat", "mot_impl", "attention_impl"):
        if getattr(FLAGS, field):
            config.model[field] = getattr(FLAGS, field)
    if FLAGS.batch_size:
        config.train.batch_size = FLAGS.batch_size
    config.train.progress_bar = False
    return config


def peak_flops() -> float | None:
    if FLAGS.peak_tflops > 0:
        return FLAGS.peak_tflops * 1e12
    return flops.peak_flops_for_device(jax.devices()[0].device_kind)


def target_stats(batch) -> dict[str, float]:
    """Real tokens of a batch and the shares of them with an image / a text target."""
    real = float(np.sum(batch["segment_ids"] > 0))
    return {"real_tokens": real,
            "image_target_fraction": float(np.sum(batch["image_mask"] > 0)) / max(real, 1.0),
            "text_target_fraction": float(np.sum(batch["text_mask"] > 0)) / max(real, 1.0)}


def flops_at_slots(model_cfg, batch_size: int, seq: int, capacity) -> float:
    """Analytic training FLOPs of the shapes the step runs: backbone, non-causal attention and the
    image input projection at every slot; the heads at their capacity slots (all slots when the
    heads run at every position)."""
    full = flops.flops_per_token(model_cfg, seq, 1.0, causal=False)  # image head per position
    none = flops.flops_per_token(model_cfg, seq, 0.0, causal=False)  # LM head per position
    image_slots = seq if capacity is None else capacity.image / capacity.group
    text_slots = seq if capacity is None else capacity.text
    head = f"{model_cfg.image_head}_head"
    forward = batch_size * (seq * (full["backbone"] + full["attention"] + full["input_proj"])
                            + image_slots * full[head] + text_slots * none["lm_head"])
    return 3.0 * forward


def size_batches(config) -> tuple[list[dict], int]:
    """Two batches of the config's packed rows (the workdir's own with --rows_from, else
    synthetic) and the text vocabulary size."""
    bs = int(config.train.batch_size)
    if FLAGS.rows_from:
        pairs = [workdir_rows(config, FLAGS.rows_from, bs, block=b) for b in range(2)]
        return [b for b, _ in pairs], pairs[0][1]
    vocab = int(config.data.sp_vocab_size)
    return [synthetic_rows(config, bs, vocab, seed=s) for s in range(2)], vocab


def run_size(size: str, mesh) -> list[dict]:
    base = size_config(size)
    bs, seq = int(base.train.batch_size), int(base.model.max_seq_len)
    packings = FLAGS.packings or [str(base.data.packing)]
    configs, data, runners = {}, {}, {}
    for p in packings:  # every packing's rows from the same data, timed side by side
        configs[p] = base.copy_and_resolve_references()
        configs[p].data.packing = p
        data[p] = size_batches(configs[p])
    variants = [(p, h) for p in packings for h in HEADS if h in FLAGS.heads]
    for p, h in variants:
        batches, vocab = data[p]
        runners[p, h] = TimedTrainStep(configs[p], vocab, batches, mesh, FLAGS.warmup, heads=h)
    times = {v: [] for v in variants}
    for _ in range(FLAGS.steps):  # round-robin: the variants see the same load
        for v in variants:
            times[v].append(runners[v].time_one())
    peak = peak_flops()
    rows = []
    for p, h in variants:
        config, (batches, vocab) = configs[p], data[p]
        stats, tstats = token_stats(batches[0]), target_stats(batches[0])
        model_cfg = config_validation.model_config(config, vocab)
        counts = flops.param_counts(model_cfg)
        per_token = flops.flops_per_token(model_cfg, seq, tstats["image_target_fraction"],
                                          text_fraction=tstats["text_target_fraction"])
        counted = per_token["train"] * tstats["real_tokens"]
        r, timing = runners[p, h], summarize(times[p, h])
        real_per_s = tstats["real_tokens"] / timing["step_s"]
        at_slots = flops_at_slots(model_cfg, bs, seq, r.capacity)
        rows.append({
            "size": size, "options": FLAGS.options, "heads": h, "packing": p,
            "rows": f"packed train rows of {FLAGS.rows_from}" if FLAGS.rows_from else "synthetic",
            "capacity": None if r.capacity is None else dataclasses.asdict(r.capacity),
            "batch_size": bs, "seq_len": seq,
            "dtype": config.model.dtype, "remat": config.model.remat,
            "mot_impl": r.mot_impl, "attention_impl": config.model.attention_impl,
            "num_modalities": config.model.num_modalities, "image_head": model_cfg.image_head,
            "params_total": counts["total"], "params_active": counts["active_per_token"],
            "train_flops_per_token": per_token["train"], "six_n": per_token["six_n"],
            **{k: v for k, v in stats.items() if k != "modality_counts"}, **tstats,
            "flops_counted": counted, "flops_executed": r.executed_flops,
            "flops_at_slots": at_slots,
            "executed_over_counted": None if r.executed_flops is None
            else r.executed_flops / counted,
            "executed_over_at_slots": None if r.executed_flops is None
            else r.executed_flops / at_slots,
            "at_slots_over_counted": at_slots / counted,
            "compile_s": r.compile_s, **timing,
            "real_tokens_per_s": real_per_s, "tokens_per_s_all_slots": bs * seq / timing["step_s"],
            "model_tflops_per_s": real_per_s * per_token["train"] / 1e12,
            "mfu": None if peak is None else flops.mfu(real_per_s, per_token["train"], peak,
                                                       mesh.size),
            "final_loss": r.loss,
        })
    label = (lambda r: r["heads"]) if len(packings) == 1 else (lambda r: f"{r['packing']}_{r['heads']}")
    for r in rows[1:]:  # the other variants against the first, from one run
        rows[0][f"step_s_{label(r)}_over_{label(rows[0])}"] = r["step_s"] / rows[0]["step_s"]
    return rows


def main(_):
    unknown = set(FLAGS.heads) - set(HEADS)
    if unknown:
        raise app.UsageError(f"--heads: unknown {sorted(unknown)}; choose from {HEADS}")
    mesh = mesh_from_flag(FLAGS.mesh)
    rows = []
    for size in FLAGS.sizes:
        for r in run_size(size, mesh):
            rows.append(r)
            mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}%"
            print(f"{size} {r['packing']} heads={r['heads']}: {r['step_s'] * 1e3:.1f} ms/step, "
                  f"{r['real_tokens_per_s']:.0f} real tok/s{mfu}, FLOPs executed/counted "
                  f"{r['executed_over_counted']:.3f}", flush=True)
        write_results("step_time", {"mesh": dict(mesh.shape), "peak_flops": peak_flops(),
                                    "steps": FLAGS.steps, "command": " ".join(sys.argv),
                                    "runs": rows}, FLAGS.out, quiet=True)
    header = (f"{'size':<6} {'packing':<9} {'heads':<7} {'params':>10} {'GFLOP/tok':>9} {'batch':>5} "
              f"{'ms/step':>9} {'real tok/s':>10} {'exec/cnt':>8} {'exec/slots':>10} "
              f"{'slots/cnt':>9} {'MFU':>6}")
    print(header)
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['size']:<6} {r['packing']:<9} {r['heads']:<7} {r['params_total']:>10,} "
              f"{r['train_flops_per_token'] / 1e9:>9.3f} {r['batch_size']:>5} "
              f"{r['step_s'] * 1e3:>9.1f} {r['real_tokens_per_s']:>10.0f} "
              f"{r['executed_over_counted']:>8.3f} {r['executed_over_at_slots']:>10.3f} "
              f"{r['at_slots_over_counted']:>9.3f} {mfu:>6}")
    write_results("step_time", {"mesh": dict(mesh.shape), "peak_flops": peak_flops(),
                                "steps": FLAGS.steps, "command": " ".join(sys.argv),
                                "runs": rows}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
