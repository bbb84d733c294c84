"""KV-cache decode time per token at short vs long context (MultimodalLM.decode, init_cache).

  python -m bench.decode --size=demo --contexts=64,1024 --steps=32

For each context C: one jitted prefill of C positions into a cache of C + steps slots, then
`steps` jitted single-position decode calls (cache donated; the first compiles), each
synchronised, alternating between the contexts; reported per token (median). The backbone only: a sampler adds one head evaluation per token (LM logits, or
ode_steps flow-head calls). For scale, `no_cache_forward_s` is one full forward over C + 1
positions, what each token would cost without a cache. The prompt is one document: a caption-like
text run, then image tokens (modality 1), repeating; decoded positions are image tokens.
Writes bench/results/decode.json.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn

from bench.common import load_config, write_results
from bench.train_harness import resolved_impl, synthetic_rows
from mmjax import config_validation
from mmjax.models.model import MultimodalLM, init_cache, init_params

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "demo", "configs/mot_shapes.py size.")
flags.DEFINE_list("contexts", ["64", "1024"], "Prompt lengths C.")
flags.DEFINE_integer("steps", 32, "Timed single-position decode steps per context.")
flags.DEFINE_integer("batch_size", 1, "Sequences decoded in lockstep.")
flags.DEFINE_string("dtype", "", "Override model.dtype; '' keeps the config's.")
flags.DEFINE_string("mot_impl", "", "Override model.mot_impl; '' keeps the config's.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/decode.json).")

TEXT_RUN, IMAGE_RUN = 30, 64  # the prompt's repeating layout (a caption, then an image)


def prompt(batch: int, length: int, start: int, code_dim: int, vocab: int, seed: int) -> dict:
    """A chunk of positions [start, start + length) of one document per row."""
    rng = np.random.default_rng(seed)
    pos = np.arange(start, start + length, dtype=np.int32)
    modality = ((pos % (TEXT_RUN + IMAGE_RUN)) >= TEXT_RUN).astype(np.int32)
    codes = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(batch, length, code_dim))
    return {"tokens": jnp.asarray(np.where(modality, 0, rng.integers(5, vocab, (batch, length)))
                                  .astype(np.int32)),
            "codes": jnp.asarray((codes * modality[None, :, None]).astype(np.float32)),
            "modality": jnp.asarray(np.broadcast_to(modality, (batch, length))),
            "positions": jnp.asarray(np.broadcast_to(pos, (batch, length))),
            "segment_ids": jnp.ones((batch, length), jnp.int32),
            "image_block": jnp.zeros((batch, length), jnp.int32)}


def image_step(batch: int, position: int, code_dim: int) -> dict:
    """One generated image position (what the flow head's output is fed back as)."""
    return {"tokens": jnp.zeros((batch, 1), jnp.int32),
            "codes": jnp.full((batch, 1, code_dim), 0.5, jnp.float32),
            "modality": jnp.ones((batch, 1), jnp.int32),
            "positions": jnp.full((batch, 1), position, jnp.int32),
            "segment_ids": jnp.ones((batch, 1), jnp.int32),
            "image_block": jnp.zeros((batch, 1), jnp.int32)}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


class ContextRun:
    """Prefill of C positions (compiled and timed), then single-position steps on demand."""

    def __init__(self, model, params, config, c: int, vocab: int):
        b, d = FLAGS.batch_size, len(config.fsq.levels)
        self.c, self.b, self.d, self.params, self.i = c, b, d, params, 0
        self.decode = jax.jit(lambda p, chunk, cache: model.apply(
            {"params": p}, chunk, cache, method=MultimodalLM.decode), donate_argnums=2)
        forward = jax.jit(lambda p, batch: model.apply({"params": p}, batch))
        slots = c + FLAGS.steps + 1
        chunk = prompt(b, c, 0, d, vocab, seed=c)
        _, self.prefill_compile_s = timed(self.decode, params, chunk,
                                          init_cache(model.cfg, b, max_len=slots))
        # Prefill again on a fresh cache for a compile-free number.
        (_, self.cache), self.prefill_s = timed(self.decode, params, chunk,
                                                init_cache(model.cfg, b, max_len=slots))
        self.step_compile_s = self.step()
        full = prompt(b, c + 1, 0, d, vocab, seed=c)
        timed(forward, params, full)  # compile
        _, self.no_cache_s = timed(forward, params, full)
        self.slots, self.times = slots, []

    def step(self) -> float:
        (_, self.cache), dt = timed(self.decode, self.params,
                                    image_step(self.b, self.c + self.i, self.d), self.cache)
        self.i += 1
        return dt

    def result(self) -> dict:
        assert int(self.cache["index"]) == self.c + self.i
        return {"context": self.c, "cache_slots": self.slots, "batch_size": self.b,
                "prefill_s": self.prefill_s, "prefill_compile_s": self.prefill_compile_s,
                "step_compile_s": self.step_compile_s,
                "per_token_s": statistics.median(self.times),
                "per_token_s_min": min(self.times), "no_cache_forward_s": self.no_cache_s}


def main(_):
    config = load_config(f"configs/mot_shapes.py:{FLAGS.size}")
    if FLAGS.dtype:
        config.model.dtype = FLAGS.dtype
    if FLAGS.mot_impl:
        config.model.mot_impl = FLAGS.mot_impl
    vocab = int(config.data.sp_vocab_size)
    model = MultimodalLM(config_validation.model_config(config, vocab))
    example = {k: jnp.asarray(v) for k, v in synthetic_rows(config, 1, vocab).items()}
    params = jax.jit(lambda r: nn.unbox(init_params(model, r, example)))(jax.random.PRNGKey(0))
    runs = [ContextRun(model, params, config, int(c), vocab) for c in FLAGS.contexts]
    for _ in range(FLAGS.steps - 1):  # alternate contexts so load drift hits all alike
        for run in runs:
            run.times.append(run.step())
    rows = [run.result() for run in runs]
    print(f"{'context':>7} {'slots':>6} {'prefill ms':>10} {'ms/token':>9} {'no-cache ms':>11}")
    for r in rows:
        print(f"{r['context']:>7} {r['cache_slots']:>6} {r['prefill_s'] * 1e3:>10.2f} "
              f"{r['per_token_s'] * 1e3:>9.3f} {r['no_cache_forward_s'] * 1e3:>11.2f}")
    ratio = rows[-1]["per_token_s"] / rows[0]["per_token_s"] if len(rows) > 1 else None
    write_results("decode", {"size": FLAGS.size, "dtype": config.model.dtype,
                             "mot_impl": resolved_impl(config.model.mot_impl, FLAGS.batch_size),
                             "steps": FLAGS.steps, "rows": rows,
                             "per_token_ratio_last_vs_first": ratio}, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
