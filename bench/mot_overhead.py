"""Mixture-of-Transformers overhead: MoT (2 and 3 modalities) vs dense step time at equal active
FLOPs, for every `model.mot_impl` this checkout has.

  python -m bench.mot_overhead --size=demo --batch_size=16
  python -m bench.mot_overhead --size=base --batch_size=32 --impls=ragged,tiled    # accelerator

All variants share one model size and one batch (text + image documents from the real packer,
bench/train_harness.py), so every token costs the same analytic FLOPs (a MoT token only uses its
own modality's weights); MoT only adds parameters, the modality sort / un-sort, and whatever the
grouped matmul implementation wastes. For mot3 the data has no third modality, so
--mot3_fraction (default 5%) of the image tokens are relabelled modality 2 (they keep the image
input projection); 0 leaves the third modality's group empty.

Impls: "ragged" = jax.lax.ragged_dot (on CPU, XLA lowers it to a masked dense matmul: ~M x the
FLOPs of a dense matmul, so expect ~M x the backbone cost there); "masked" = every token through
every modality's weights (reference, M x FLOPs by construction); "tiled" (when present) = groups
padded to whole tiles and one batched matmul; "buckets" = each batch shard sorted into a text
and an image bucket sized by the packer's layout (model image_capacity), one dense matmul per
modality ("auto" on CPU for packed rows; mot3 has no buckets and runs what "auto" picks then,
recorded in `impl`). Dense (num_modalities=1) takes none of these paths.
With the flow head (default) the head's FLOPs (run on every position, several t-samples) can
outweigh the backbone's at small sizes and hide the MoT cost; --options=discrete shrinks the
head so the backbone dominates. Writes bench/results/mot_overhead.json.
"""
from __future__ import annotations

from absl import app, flags

from bench.common import load_config, write_results
from bench.train_harness import TimedTrainStep, available_impls, mesh_from_flag, \
    summarize, synthetic_rows, token_stats
from mmjax import config_validation, flops

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "demo", "configs/mot_shapes.py size.")
flags.DEFINE_string("options", "", "Extra config options, e.g. 'discrete' (a small image head, "
                    "so the backbone dominates the step).")
flags.DEFINE_list("impls", [], "mot_impl values to time (default: all this checkout has).")
flags.DEFINE_list("variants", ["dense", "mot2", "mot3"], "Which models to time.")
flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's train.batch_size).")
flags.DEFINE_integer("steps", 5, "Timed rounds (one step of every variant per round).")
flags.DEFINE_integer("warmup", 2, "Untimed steps, the first of which compiles.")
flags.DEFINE_float("mot3_fraction", 0.05, "Share of image tokens given modality 2 for mot3.")
flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes (-1: the rest).")
flags.DEFINE_string("dtype", "", "Override model.dtype; '' keeps the config's.")
flags.DEFINE_string("attention_impl", "", "Override model.attention_impl; '' keeps the config's.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/mot_overhead.json).")

MODALITIES = {"dense": 1, "mot2": 2, "mot3": 3}


def variant_config(variant: str, impl: str):
    spec = ",".join([FLAGS.size] + [o for o in FLAGS.options.split(",") if o])
    config = load_config(f"configs/mot_shapes.py:{spec}")
    config.model.num_modalities = MODALITIES[variant]
    if impl:  # dense keeps the default (one modality takes no grouped path)
        config.model.mot_impl = impl
    if FLAGS.dtype:
        config.model.dtype = FLAGS.dtype
    if FLAGS.attention_impl:
        config.model.attention_impl = FLAGS.attention_impl
    if FLAGS.batch_size:
        config.train.batch_size = FLAGS.batch_size
    return config


def main(_):
    mesh = mesh_from_flag(FLAGS.mesh)
    impls = FLAGS.impls or list(available_impls())
    base = variant_config("dense", None)
    vocab, bs = int(base.data.sp_vocab_size), int(base.train.batch_size)
    data = {frac: [synthetic_rows(base, bs, vocab, seed=s, third_modality_fraction=frac)
                   for s in range(2)] for frac in (0.0, FLAGS.mot3_fraction)}
    runs, runners = [], []
    for variant in FLAGS.variants:
        for impl in (["-"] if variant == "dense" else impls):
            config = variant_config(variant, None if impl == "-" else impl)
            batches = data[FLAGS.mot3_fraction if variant == "mot3" else 0.0]
            runners.append(TimedTrainStep(config, vocab, batches, mesh, FLAGS.warmup))
            stats = token_stats(batches[0])
            model_cfg = config_validation.model_config(config, vocab)
            counts = flops.param_counts(model_cfg)
            per_token = flops.flops_per_token(model_cfg, model_cfg.max_seq_len,
                                              stats["image_fraction"])
            runs.append({"variant": variant, "impl": impl if impl == "-" else runners[-1].mot_impl,
                         "num_modalities": MODALITIES[variant],
                         "params_total": counts["total"],
                         "params_active": counts["active_per_token"],
                         "train_flops_per_token": per_token["train"],
                         "modality_counts": stats["modality_counts"],
                         "compile_s": runners[-1].compile_s})
            print(f"compiled {variant} {impl} in {runners[-1].compile_s:.1f} s", flush=True)
    # Round-robin: each round times one step of every variant, so load drift hits all alike.
    times = [[] for _ in runners]
    for _ in range(FLAGS.steps):
        for t, runner in zip(times, runners):
            t.append(runner.time_one())
    for run, t, runner in zip(runs, times, runners):
        run.update(summarize(t), final_loss=runner.loss)
    dense = next((r["step_s"] for r in runs if r["variant"] == "dense"), None)
    print(f"{'variant':<6} {'impl':<7} {'params':>10} {'active':>10} {'ms/step':>9} "
          f"{'vs dense':>8}")
    for r in runs:
        r["vs_dense"] = None if dense is None else r["step_s"] / dense
        ratio = "" if dense is None else f"{r['vs_dense']:.2f}x"
        print(f"{r['variant']:<6} {r['impl']:<7} {r['params_total']:>10,} "
              f"{r['params_active']:>10,} {r['step_s'] * 1e3:>9.1f} {ratio:>8}")
    write_results("mot_overhead", {"size": FLAGS.size, "options": FLAGS.options, "batch_size": bs,
                                   "seq_len": int(base.model.max_seq_len),
                                   "mot3_fraction": FLAGS.mot3_fraction, "mesh": dict(mesh.shape),
                                   "attention_impl": base.model.attention_impl,
                                   "steps": FLAGS.steps, "runs": runs}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
