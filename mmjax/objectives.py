"""Training losses of the multimodal LM: text cross-entropy plus an image loss.

Image loss: the configured image head's `loss_terms` (mmjax/image_heads.py): rectified flow on
FSQ code vectors (model.image_head = "flow", `flow_terms`) or cross-entropy on FSQ indices
("discrete", `discrete_terms`). Every term is a masked mean over the positions that carry it
(`text_mask`, `image_mask` of docs/INTERFACES.md) and is exactly 0 when a batch has none, so a
text-only or image-only batch gives finite losses and gradients.

Flow loss (JanusFlow / SD3 rectified flow, with MAR's several samples per position): for each of
K = model.flow_t_samples draws, t ~ U(0, 1) or logit-normal, x0 ~ N(0, I), x1 = code_targets,
x_t = t x1 + (1 - t) x0, target v = x1 - x0; loss = mean over channels of (v_pred - v)^2.
The backbone runs once; only the small head runs K times.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mmjax.models import heads


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The checked `objective` block (config_validation.objective_config builds it; the fields
    and their meaning are config_defaults.objective_config's)."""

    text_weight: float
    image_weight: float
    flow_t_dist: str
    flow_logit_std: float
    t2i_prob: float
    caption_dropout: float
    direction_redraws: int


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where mask > 0; 0 (not NaN) when the mask is empty. NaNs outside the
    mask are ignored (a `where`, not a multiply)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, values.astype(jnp.float32) * mask, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position CE (nats) of integer targets [...] under logits [..., V]; targets clipped to
    the vocabulary (they are arbitrary where no loss applies)."""
    logits = logits.astype(jnp.float32)
    targets = jnp.clip(targets, 0, logits.shape[-1] - 1)[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets, -1)[..., 0]


# objective.flow_t_dist -> sampler of t; keys are choices.CHOICES["objective.flow_t_dist"].
T_DISTS = {
    "uniform": lambda rng, shape, objective: jax.random.uniform(rng, shape),
    "logit_normal": lambda rng, shape, objective: jax.nn.sigmoid(
        objective.flow_logit_std * jax.random.normal(rng, shape)),
}


def sample_t(rng: jax.Array, shape, objective: ObjectiveConfig) -> jax.Array:
    """Flow times in (0, 1): uniform, or sigmoid(N(0, flow_logit_std^2)) (objective.flow_t_dist)."""
    return T_DISTS[objective.flow_t_dist](rng, shape, objective)


def text_terms(model, variables, hidden, batch):
    """Text CE over text_mask -> (loss, metrics)."""
    logits = model.apply(variables, hidden, method=model.lm_logits)
    mask = batch["text_mask"]
    loss = masked_mean(cross_entropy(logits, batch["text_targets"]), mask)
    correct = (jnp.argmax(logits, -1) == batch["text_targets"]).astype(jnp.float32)
    return loss, {"text_loss": loss, "text_ppl": jnp.exp(loss),
                  "text_accuracy": masked_mean(correct, mask), "text_tokens": jnp.sum(mask)}


def flow_terms(model, variables, hidden, batch, rng, objective: ObjectiveConfig):
    """Rectified-flow MSE over image_mask with model.flow_t_samples (t, x0) draws per position."""
    num_samples = model.cfg.flow_t_samples
    x1 = batch["code_targets"].astype(jnp.float32)
    rng_t, rng_x0 = jax.random.split(rng)
    t = sample_t(rng_t, (num_samples,) + x1.shape[:-1], objective)
    x0 = jax.random.normal(rng_x0, (num_samples,) + x1.shape)
    x_t = t[..., None] * x1 + (1.0 - t[..., None]) * x0
    v = model.apply(variables, hidden, x_t, t, method=model.flow_velocity)
    mse = jnp.mean(jnp.square(v - (x1 - x0)), axis=(0, -1))  # over samples and channels
    loss = masked_mean(mse, batch["image_mask"])
    return loss, {"image_loss": loss, "flow_mse": loss}


def discrete_terms(model, variables, hidden, batch, rng, objective: ObjectiveConfig):
    """FSQ-index CE over image_mask; also bits per code and accuracy (`rng` is unused)."""
    levels = model.cfg.fsq_levels
    logits = model.apply(variables, hidden, method=model.index_logits)
    mask = batch["image_mask"]
    targets = jnp.clip(batch["index_targets"], 0, math.prod(levels) - 1)
    loss = masked_mean(heads.index_nll(logits, targets, levels), mask)
    correct = (heads.index_argmax(logits, levels) == targets).astype(jnp.float32)
    return loss, {"image_loss": loss, "image_bits_per_code": loss / math.log(2.0),
                  "image_accuracy": masked_mean(correct, mask)}


def compute_losses(model, params, batch, rng, objective: ObjectiveConfig, *, train: bool):
    """(loss, metrics) of a packed batch. `model` is a MultimodalLM (its `cfg.head` gives the
    image loss), `params` its (unboxed or boxed) params, `rng` feeds CAM noise augmentation and
    the flow samples. Pure and jittable."""
    rng_noise, rng_flow = jax.random.split(rng)
    variables = {"params": params}
    hidden = model.apply(variables, batch, train=train, rngs={"noise": rng_noise})
    text_loss, metrics = text_terms(model, variables, hidden, batch)
    image_loss, image_metrics = model.cfg.head.loss_terms(model, variables, hidden, batch, rng_flow,
                                                          objective)
    metrics.update(image_metrics)
    metrics["image_tokens"] = jnp.sum(batch["image_mask"].astype(jnp.float32))
    loss = objective.text_weight * text_loss + objective.image_weight * image_loss
    metrics["loss"] = loss
    return loss, metrics
