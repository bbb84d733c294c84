"""Train step time, tokens/s and MFU vs model size (configs/mot_shapes.py sizes).

  python -m bench.step_time --sizes=smoke,demo,small                 # CPU
  python -m bench.step_time --sizes=base,300m,1b --batch_size=32     # accelerator (bf16, remat)

Synthetic packed batches (bench/train_harness.py) go through the trainer's own jitted step
(`train.build_setup`: AdamW, clipping, sharding from the rules table). FLOPs per token are
analytic (`mmjax.flops.flops_per_token`, causal-average attention; image_fraction measured on the
batch); MFU = achieved model FLOP/s / (peak x devices), peak from --peak_tflops or the device kind
(none on CPU unless given). tokens/s counts every position of the packed rows (padding included);
real_tokens_per_s counts only non-padding ones. Writes bench/results/step_time.json.
"""
from __future__ import annotations

import jax
from absl import app, flags

from bench.common import load_config, write_results
from bench.train_harness import mesh_from_flag, resolved_impl, synthetic_rows, time_train_steps, token_stats
from mmjax import config_validation, flops

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["smoke", "demo", "small"], "configs/mot_shapes.py sizes.")
flags.DEFINE_string("options", "", "Extra config options, e.g. 'dense' or 'discrete,mot3'.")
flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's train.batch_size).")
flags.DEFINE_integer("steps", 5, "Timed steps per size (after compile + warmup).")
flags.DEFINE_integer("warmup", 2, "Untimed steps, the first of which compiles.")
flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes (-1: the rest).")
flags.DEFINE_string("dtype", "", "Override model.dtype (e.g. bfloat16); '' keeps the config's.")
flags.DEFINE_string("remat", "", "Override model.remat; '' keeps the config's.")
flags.DEFINE_string("mot_impl", "", "Override model.mot_impl; '' keeps the config's.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: from device kind).")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/step_time.json).")


def size_config(size: str):
    spec = ",".join([size] + [o for o in FLAGS.options.split(",") if o])
    config = load_config(f"configs/mot_shapes.py:{spec}")
    for field in ("dtype", "remat", "mot_impl"):
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


def run_size(size: str, mesh) -> dict:
    config = size_config(size)
    vocab = int(config.data.sp_vocab_size)
    bs, seq = int(config.train.batch_size), int(config.model.max_seq_len)
    batches = [synthetic_rows(config, bs, vocab, seed=s) for s in range(2)]
    stats = token_stats(batches[0])
    timing = time_train_steps(config, vocab, batches, mesh, steps=FLAGS.steps,
                              warmup=FLAGS.warmup)
    model_cfg = config_validation.model_config(config, vocab)
    counts = flops.param_counts(model_cfg)
    per_token = flops.flops_per_token(model_cfg, seq, stats["image_fraction"])
    tokens_per_s = bs * seq / timing["step_s"]
    peak = peak_flops()
    return {
        "size": size, "options": FLAGS.options, "batch_size": bs, "seq_len": seq,
        "dtype": config.model.dtype, "remat": config.model.remat,
        "mot_impl": resolved_impl(config.model.mot_impl), "num_modalities": config.model.num_modalities,
        "params_total": counts["total"], "params_active": counts["active_per_token"],
        "train_flops_per_token": per_token["train"], "six_n": per_token["six_n"],
        **{k: v for k, v in stats.items() if k != "modality_counts"},
        "compile_s": timing["compile_s"], "step_s": timing["step_s"],
        "step_s_min": timing["step_s_min"], "tokens_per_s": tokens_per_s,
        "real_tokens_per_s": tokens_per_s * stats["real_fraction"],
        "model_tflops_per_s": tokens_per_s * per_token["train"] / 1e12,
        "mfu": None if peak is None else flops.mfu(tokens_per_s, per_token["train"], peak,
                                                   mesh.size),
        "final_loss": timing["final_loss"],
    }


def main(_):
    mesh = mesh_from_flag(FLAGS.mesh)
    rows = []
    for size in FLAGS.sizes:
        rows.append(run_size(size, mesh))
        r = rows[-1]
        mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}%"
        print(f"{size}: {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s{mfu}",
              flush=True)
        write_results("step_time", {"mesh": dict(mesh.shape), "peak_flops": peak_flops(),
                                    "steps": FLAGS.steps, "runs": rows}, FLAGS.out, quiet=True)
    header = (f"{'size':<6} {'params':>10} {'active':>10} {'GFLOP/tok':>9} {'batch':>5} "
              f"{'ms/step':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    print(header)
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['size']:<6} {r['params_total']:>10,} {r['params_active']:>10,} "
              f"{r['train_flops_per_token'] / 1e9:>9.3f} {r['batch_size']:>5} "
              f"{r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['model_tflops_per_s']:>8.4f} {mfu:>6}")
    write_results("step_time", {"mesh": dict(mesh.shape), "peak_flops": peak_flops(),
                                "steps": FLAGS.steps, "runs": rows}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
