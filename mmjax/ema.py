"""An exponential moving average of the trained params, for sampling and evals.

Why: a generative model sampled from its last iterate inherits the noise of the last few hundred
updates (extra blobs, drifting colours); DiT, MAR and big_vision sample from an EMA of the weights
instead. The average is kept beside the params in the train state (`state["ema_params"]`, same
shardings, checkpointed, resumed bitwise) only when `train.ema_decay > 0`; it never feeds back
into training, so a run with it takes exactly the same steps as one without it, and the two kinds
of weights of one run can be scored side by side (`sample.weights`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

STATE_KEY = "ema_params"  # the train state's entry (and the checkpoint's) holding the average
WARMUP_OFFSET = 10.0  # decay_t = min(decay, (1 + t) / (10 + t)): early averages forget the init


def decay_at(step, decay: float) -> jax.Array:
    """The decay applied after update `step` (0-based).

    Why the warm-up: with a fixed 0.999 the average of a 3000-step run would still hold
    e^-3 = 5% of the random init; (1 + t) / (10 + t) (TensorFlow's ExponentialMovingAverage with
    num_updates) makes the early average track the params, then settles at `decay`.
    """
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (WARMUP_OFFSET + t))


def update(ema_params: Any, params: Any, step, decay: float) -> Any:
    """ema <- d * ema + (1 - d) * params, d = decay_at(step, decay), in float32 per leaf."""
    d = decay_at(step, decay)
    return jax.tree.map(
        lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(
            e.dtype), ema_params, params)


def decay_of(train_block) -> float:
    """A train block's `ema_decay` (0 = no average; a block stored before the field had none)."""
    return float(train_block.get("ema_decay", 0.0))


def params_key(ema_decay: float, weights: str = "auto") -> str:
    """The train-state entry that sampling and evals read: "ema_params" or "params".

    `ema_decay` is the run's (`train.ema_decay`, `tokenizer_train.ema_decay`); `weights` is
    `sample.weights`: "auto" reads the average when the run keeps one, "ema" insists (the config
    check refuses it without one), "raw" reads the last iterate.
    """
    if weights == "auto":
        return STATE_KEY if float(ema_decay) > 0 else "params"
    return STATE_KEY if weights == "ema" else "params"


def model_params_key(config) -> str:
    """`params_key` of the model stage of a full config."""
    return params_key(decay_of(config.train), config.sample.get("weights", "auto"))
