"""Does `jax.lax.ragged_dot` cost M x the FLOPs of one dense matmul? Compiled HLO, XLA's
cost_analysis and timing of ragged_dot vs a dense matmul of the same shape vs the tiled path.

  python -m bench.ragged_dot_check                       # this backend, default XLA flags
  python -m bench.ragged_dot_check --xla_variants        # GPU: also with cuDNN ragged-dot fusion

For each shape (rows N = batch x seq of a model size, K -> F one MoT projection, M modalities,
groups split N evenly) it compiles three functions on the default backend:
  dense:  x [N, K] @ w[0] [K, F]                    (the FLOPs a grouped matmul should cost)
  ragged: jax.lax.ragged_dot(x, w [M, K, F], sizes)  (what mot_impl='ragged' runs)
  tiled:  mot.tiled_grouped_matmul on the tile-padded layout (mot_impl='tiled')
and records: XLA's `cost_analysis()['flops']`, whether the optimised HLO still holds a
ragged-dot / a cuDNN or cuBLAS grouped-GEMM custom call or was rewritten to dense dots (the
`dot(` ops and their shapes), and the median time of `--repeats` synchronised calls.

What was found without a GPU (bench/results/ragged_dot_check_cpu.json and the report):
- jax 0.10.2 lowers ragged_dot on CPU (the default rule) to `_ragged_dot_general_impl`: x is
  broadcast to [M, N, K], masked by group, and contracted with w over (M, K): one dense dot of
  M x the FLOPs (cost_analysis says so too).
- On 'cuda' and 'tpu' jax emits `chlo.ragged_dot` (checked by lowering for those platforms
  here); what XLA:GPU does with it is decided at compile time: unless the cuDNN ragged-dot
  fusion (`--xla_gpu_experimental_use_ragged_dot_fusion`) is on and supported, its
  RaggedDotRewriter expands it into a zero-padded batched dense dot, i.e. M x the FLOPs. This
  script measures which of the two a GPU run gets (`--xla_variants` re-runs itself with the
  flag in XLA_FLAGS).
Writes bench/results/ragged_dot_check_<backend>.json (with the command and git commit).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.common import git_commit, write_results
from mmjax.models import mot

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["4096x128x384x2", "32768x1024x2816x2", "32768x2048x5632x2"],
                  "NxKxFxM: rows, in, out, modalities (demo; 300m and 1b at 16 x 2048 rows).")
flags.DEFINE_string("dtype", "", "float32 | bfloat16; '' = bfloat16 on accelerators, f32 on CPU.")
flags.DEFINE_integer("tile", 128, "model.mot_tile of the tiled path.")
flags.DEFINE_integer("repeats", 10, "Timed calls per function.")
flags.DEFINE_bool("time_cpu_large", False, "Also time the big shapes on CPU (slow).")
flags.DEFINE_bool("xla_variants", False, "Re-run in a subprocess with the cuDNN ragged-dot "
                  "fusion XLA flag (GPU only) and record both.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/ragged_dot_check_<b>.json).")

FUSION_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"


def hlo_summary(text: str) -> dict:
    """What the optimised HLO does with the grouped matmul."""
    dots = re.findall(r"= (\w+\[[\d,]*\])\{?[^ ]* dot\(", text)
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    return {"ragged_dot_ops": text.count("ragged-dot("), "dot_ops": len(dots),
            "dot_output_shapes": sorted(set(dots))[:8], "custom_call_targets": targets}


def functions(m: int, tile: int):
    def dense(x, w, sizes):
        return x @ w[0]

    def ragged(x, w, sizes):
        return jax.lax.ragged_dot(x, w, sizes)

    def tiled(x, w, sizes):
        # The tile-padded layout mot.make_routing builds (rows already sorted by group).
        ids = jnp.repeat(jnp.arange(m, dtype=jnp.int32), x.shape[0] // m,
                         total_repeat_length=x.shape[0])
        routing = mot.make_routing(ids, m, 1, tile)
        xs = mot.to_sorted(x[None], routing)
        return mot.from_sorted(mot.tiled_grouped_matmul(xs, w, routing.tile_group), routing,
                               (x.shape[0], w.shape[-1]))

    return {"dense": dense, "ragged": ragged, "tiled": tiled}


def measure_shape(spec: str, dtype, timed: bool) -> dict:
    n, k, f, m = (int(v) for v in spec.split("x"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, k)), dtype)
    w = jnp.asarray(rng.normal(size=(m, k, f)) * k ** -0.5, dtype)
    sizes = jnp.full((m,), n // m, jnp.int32).at[-1].add(n - m * (n // m))
    row = {"shape": spec, "dense_flops": 2.0 * n * k * f, "impls": {}}
    outs = {}
    for name, fn in functions(m, FLAGS.tile).items():
        compiled = jax.jit(fn).lower(x, w, sizes).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        r = {"xla_flops": float(cost.get("flops", float("nan"))) if cost else None,
             **hlo_summary(compiled.as_text())}
        if r["xla_flops"]:
            r["xla_flops_over_dense"] = r["xla_flops"] / row["dense_flops"]
        if timed:
            out = jax.block_until_ready(compiled(x, w, sizes))
            times = []
            for _ in range(FLAGS.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(x, w, sizes))
                times.append(time.perf_counter() - t0)
            r["time_s"] = statistics.median(times)
            r["tflops_per_s_at_dense_count"] = row["dense_flops"] / r["time_s"] / 1e12
            outs[name] = np.asarray(out, np.float32)
        row["impls"][name] = r
        print(f"{spec:>20} {name:>7} flops/dense {r.get('xla_flops_over_dense', float('nan')):6.2f}"
              + (f"  {r['time_s'] * 1e3:9.3f} ms" if timed else "")
              + f"  ragged-dot ops {r['ragged_dot_ops']} dots {r['dot_ops']}"
              f" custom calls {r['custom_call_targets']}", flush=True)
    if "ragged" in outs and "tiled" in outs:  # same math, so the timings compare like for like
        ref = np.concatenate([outs["dense"][: n // m]], 0)
        row["ragged_matches_first_group_dense"] = bool(np.allclose(
            outs["ragged"][: n // m], ref, rtol=2e-2, atol=2e-2))
        row["tiled_matches_ragged"] = bool(np.allclose(outs["tiled"], outs["ragged"], rtol=2e-2,
                                                       atol=2e-2))
    return row


def lowering_by_platform(spec: str) -> dict:
    """Which op jax emits for ragged_dot per platform (lowering only: no device needed)."""
    n, k, f, m = (int(v) for v in spec.split("x"))
    args = (jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((m, k, f), jnp.bfloat16), jax.ShapeDtypeStruct((m,), jnp.int32))
    out = {}
    for platform in ("cpu", "cuda", "tpu"):
        try:
            text = jax.jit(jax.lax.ragged_dot).trace(*args).lower(
                lowering_platforms=(platform,)).as_text()
        except Exception as e:  # noqa: BLE001 - a platform this jaxlib cannot lower for
            out[platform] = f"lowering failed: {type(e).__name__}"
            continue
        out[platform] = ("chlo.ragged_dot" if "chlo.ragged_dot" in text else
                         "masked dense dot_general" if "dot_general" in text else "other")
    return out



def main(_):
    backend = jax.default_backend()
    dtype = jnp.dtype(FLAGS.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    rows = []
    for i, spec in enumerate(FLAGS.shapes):
        timed = backend != "cpu" or i == 0 or FLAGS.time_cpu_large
        rows.append(measure_shape(spec, dtype, timed))
    result = {"command": "python -m bench.ragged_dot_check " + " ".join(sys.argv[1:]),
              "git_commit": git_commit(), "backend": backend, "dtype": dtype.name,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "jax_lowering_by_platform": lowering_by_platform(FLAGS.shapes[0]), "rows": rows}
    if FLAGS.xla_variants and backend == "gpu" and FUSION_FLAG not in result["xla_flags"]:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FUSION_FLAG))
        tmp = f"/tmp/ragged_dot_check_fusion_{os.getpid()}.json"
        args = [a for a in sys.argv[1:] if not a.startswith("--xla_variants")
                and not a.startswith("--out")]
        proc = subprocess.run([sys.executable, "-m", "bench.ragged_dot_check", *args,
                               f"--out={tmp}"], env=env, capture_output=True, text=True)
        result["with_cudnn_fusion_flag"] = (json.load(open(tmp)) if proc.returncode == 0 else
                                            {"error": proc.stderr[-2000:]})
    write_results(f"ragged_dot_check_{backend}", result, FLAGS.out
                  or os.path.join(os.path.dirname(__file__), "results",
                                  f"ragged_dot_check_{backend}.json"))


if __name__ == "__main__":
    app.run(main)
