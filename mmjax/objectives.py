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

Heads only where their targets are: given a `targets.TargetCapacity` (the task passes the
packer's, config_validation.target_capacity), `compute_losses` gathers each row's text-target
positions and each row group's image-target positions to that static capacity (mmjax/targets.py)
and the LM and image heads run
on those slots only; the masked means are the same sums, so losses and gradients equal the
all-positions path (capacity=None, kept as the reference). The flow draws (t, x0) are still made
at every position with the same keys and shapes, then gathered, so the rng use and therefore the
loss value are unchanged by the gather (the draws cost K x B x T x d random numbers, no matmul).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mmjax import targets as targets_lib
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


def _all_positions(mask) -> targets_lib.Slots:
    return targets_lib.select(mask, None, "")


def text_terms(model, variables, hidden, batch, slots: targets_lib.Slots | None = None):
    """Text CE over text_mask -> (loss, metrics); the LM head runs at `slots` (default: every
    position) of hidden [B, T, D]."""
    slots = slots or _all_positions(batch["text_mask"])
    logits = model.apply(variables, slots.take(hidden), method=model.lm_logits)
    mask, text_targets = slots.weight, slots.take(batch["text_targets"])
    loss = masked_mean(cross_entropy(logits, text_targets), mask)
    correct = (jnp.argmax(logits, -1) == text_targets).astype(jnp.float32)
    return loss, {"text_loss": loss, "text_ppl": jnp.exp(loss),
                  "text_accuracy": masked_mean(correct, mask), "text_tokens": jnp.sum(mask)}


def flow_terms(model, variables, hidden, batch, rng, objective: ObjectiveConfig,
               slots: targets_lib.Slots | None = None):
    """Rectified-flow MSE over image_mask with model.flow_t_samples (t, x0) draws per position;
    the head runs at `slots` (default: every position). The draws are made at every position
    [K, B, T] and then gathered, so they do not depend on the capacity (see the module doc)."""
    slots = slots or _all_positions(batch["image_mask"])
    num_samples = model.cfg.flow_t_samples
    x1 = batch["code_targets"].astype(jnp.float32)
    rng_t, rng_x0 = jax.random.split(rng)
    t = slots.take(sample_t(rng_t, (num_samples,) + x1.shape[:-1], objective), axis=2)
    x0 = slots.take(jax.random.normal(rng_x0, (num_samples,) + x1.shape), axis=2)
    x1 = slots.take(x1)
    x_t = t[..., None] * x1 + (1.0 - t[..., None]) * x0
    v = model.apply(variables, slots.take(hidden), x_t, t, method=model.flow_velocity)
    mse = jnp.mean(jnp.square(v - (x1 - x0)), axis=(0, -1))  # over samples and channels
    loss = masked_mean(mse, slots.weight)
    return loss, {"image_loss": loss, "flow_mse": loss}


def discrete_terms(model, variables, hidden, batch, rng, objective: ObjectiveConfig,
                   slots: targets_lib.Slots | None = None):
    """FSQ-index CE over image_mask; also bits per code and accuracy (`rng` is unused); the head
    runs at `slots` (default: every position)."""
    slots = slots or _all_positions(batch["image_mask"])
    levels = model.cfg.fsq_levels
    logits = model.apply(variables, slots.take(hidden), method=model.index_logits)
    mask = slots.weight
    targets = jnp.clip(slots.take(batch["index_targets"]), 0, math.prod(levels) - 1)
    loss = masked_mean(heads.index_nll(logits, targets, levels), mask)
    correct = (heads.index_argmax(logits, levels) == targets).astype(jnp.float32)
    return loss, {"image_loss": loss, "image_bits_per_code": loss / math.log(2.0),
                  "image_accuracy": masked_mean(correct, mask)}


def compute_losses(model, params, batch, rng, objective: ObjectiveConfig, *, train: bool,
                   capacity: targets_lib.TargetCapacity | None = None):
    """(loss, metrics) of a packed batch. `model` is a MultimodalLM (its `cfg.head` gives the
    image loss), `params` its (unboxed or boxed) params, `rng` feeds CAM noise augmentation and
    the flow samples. `capacity`: run the heads only at each row's target positions, gathered to
    that many slots (None: at every position, masked; same loss). A row over capacity raises
    where the masks are concrete and makes the loss NaN under jit (metrics["targets_over_capacity"]
    counts the excess; mmjax/targets.py says why). Pure and jittable."""
    rng_noise, rng_flow = jax.random.split(rng)
    variables = {"params": params}
    hidden = model.apply(variables, batch, train=train, rngs={"noise": rng_noise})
    cap = capacity or targets_lib.TargetCapacity(image=None, text=None)
    text_slots = targets_lib.select(batch["text_mask"], cap.text, "text")
    image_slots = targets_lib.select(batch["image_mask"], cap.image, "image", cap.group)
    text_loss, metrics = text_terms(model, variables, hidden, batch, text_slots)
    image_loss, image_metrics = model.cfg.head.loss_terms(model, variables, hidden, batch, rng_flow,
                                                          objective, image_slots)
    metrics.update(image_metrics)
    metrics["image_tokens"] = jnp.sum(batch["image_mask"].astype(jnp.float32))
    over = text_slots.overflow + image_slots.overflow
    loss = objective.text_weight * text_loss + objective.image_weight * image_loss
    loss = jnp.where(over > 0, jnp.nan, loss)
    metrics["loss"] = loss
    metrics["targets_over_capacity"] = over.astype(jnp.float32)
    return loss, metrics
