"""Compiled temp memory and time of an attention training step, reference vs fused paths.

  python -m bench.attention_memory --lengths=1024,8192 --time_lengths=128,256,512,1024,2048

The step is loss + grad of attention alone (q, k, v -> sum(attend(q, k, v) * w), grads w.r.t.
q, k, v) at the demo's head shape (4 heads x 32) and batch 1 (--heads, --head_dim, --batch), on a
packed layout like the demo's:
documents of a 30-token caption then a 64-token *context* image block (bidirectional), repeated.
Memory is XLA's `compiled.memory_analysis().temp_size_in_bytes` (nothing is run for it); time is
the median of `--repeats` synchronised runs (only for --time_lengths). Paths measured here are the
ones that run on CPU: 'reference' (dense [B, H, T, S] logits), 'chunked' (online softmax), and
'cudnn' run through XLA (`implementation=None`; on a GPU it would be cuDNN with the same dense
bool mask). 'pallas' in interpret mode is not a meaningful memory or time figure on CPU.
Writes bench/results/attention_memory.json (with the command and git commit).
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.common import git_commit, write_results
from mmjax.models import attention

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["1024", "8192"], "Sequence lengths for the memory figures.")
flags.DEFINE_list("time_lengths", ["128", "256", "512", "1024", "2048"],
                  "Sequence lengths that are also timed.")
flags.DEFINE_list("impls", ["reference", "chunked", "cudnn"], "Paths to measure.")
flags.DEFINE_integer("block", 512, "model.attention_block of the chunked path.")
flags.DEFINE_integer("batch", 1, "Rows per step (each the packed layout below).")
flags.DEFINE_integer("heads", 4, "Attention heads.")
flags.DEFINE_integer("head_dim", 32, "Head dimension.")
flags.DEFINE_integer("repeats", 5, "Timed runs per (path, length).")
flags.DEFINE_bool("check", True, "On timed lengths: largest |difference| of the output and of each "
                  "gradient from the 'reference' path on the same inputs (on an accelerator this is "
                  "the fused kernels' equivalence check on real hardware).")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/attention_memory.json).")

TEXT_RUN, IMAGE_RUN = 30, 64


def layout(length: int):
    """segment_ids / image_block [1, L] of repeated caption + context-image documents."""
    pos = np.arange(length)
    doc = pos // (TEXT_RUN + IMAGE_RUN)
    in_image = (pos % (TEXT_RUN + IMAGE_RUN)) >= TEXT_RUN
    return (jnp.asarray((doc + 1)[None], jnp.int32),
            jnp.asarray(np.where(in_image, doc + 1, 0)[None], jnp.int32))


def step_fn(impl: str, spec):
    def attend(q, k, v):
        if impl == "cudnn":  # cuDNN itself off CPU; the same call through XLA on CPU
            return attention.cudnn_attend(q, k, v, spec, implementation=None if
                                          jax.default_backend() == "cpu" else "cudnn")
        return attention.attend(q, k, v, spec, impl, FLAGS.block)

    def loss(q, k, v, w):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(impl: str, length: int, timed: bool) -> dict:
    seg, blk = (jnp.tile(x, (FLAGS.batch, 1)) for x in layout(length))
    spec = attention.train_spec(seg, blk, True)
    shape = (FLAGS.batch, length, FLAGS.heads, FLAGS.head_dim)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16  # cuDNN: 16-bit
    args = [jax.ShapeDtypeStruct(shape, dtype)] * 3 + [jax.ShapeDtypeStruct(shape, jnp.float32)]
    fn = step_fn(impl, spec)
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    row = {"impl": impl, "length": length, "temp_bytes": int(mem.temp_size_in_bytes),
           "argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes)}
    if timed:
        rng = np.random.default_rng(0)
        real = [jnp.asarray(rng.normal(size=shape), a.dtype) for a in args]
        got = jax.block_until_ready(compiled(*real))
        if FLAGS.check and impl != "reference":
            row.update(max_error(got, step_fn("reference", spec)(*real)))
        times = []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*real))
            times.append(time.perf_counter() - t0)
        row["step_s"] = statistics.median(times)
        row["step_s_min"] = min(times)
    return row


def max_error(got, want) -> dict:
    """Largest |got - want| of the loss and of the q, k, v gradients, each also relative to the
    largest |want| of that array (bf16 inputs on accelerators: ~1e-2 relative is rounding)."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    out = {"loss_abs_err": float(abs(loss - ref_loss)),
           "loss_rel_err": float(abs(loss - ref_loss) / max(abs(float(ref_loss)), 1e-30))}
    for name, g, r in zip("qkv", grads, ref_grads):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        err = float(np.max(np.abs(g - r)))
        out[f"grad_{name}_max_abs_err"] = err
        out[f"grad_{name}_rel_err"] = err / max(float(np.max(np.abs(r))), 1e-30)
    return out


def main(_):
    lengths = sorted({int(x) for x in FLAGS.lengths + FLAGS.time_lengths})
    timed = {int(x) for x in FLAGS.time_lengths}
    rows = []
    for length in lengths:
        for impl in FLAGS.impls:
            rows.append(measure(impl, length, length in timed))
            r = rows[-1]
            print(f"{impl:>9} L={length:>5} temp {r['temp_bytes'] / 2**20:9.1f} MiB"
                  + (f"  step {r['step_s'] * 1e3:8.2f} ms" if "step_s" in r else "")
                  + (f"  grad rel err q/k/v {r['grad_q_rel_err']:.1e}/{r['grad_k_rel_err']:.1e}/"
                     f"{r['grad_v_rel_err']:.1e}" if "grad_q_rel_err" in r else ""), flush=True)
    write_results("attention_memory", {
        "command": "python -m bench.attention_memory " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(), "heads": FLAGS.heads, "head_dim": FLAGS.head_dim,
        "batch_size": FLAGS.batch, "block": FLAGS.block, "rows": rows}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
