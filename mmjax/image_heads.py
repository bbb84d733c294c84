"""The image-head registry: each head is ONE entry holding everything the rest of mmjax needs.

An `ImageHead` entry holds the flax module the model builds, the parameter attribute it lives
under, how `init_all` touches it, its training loss terms, its per-token sampler, its parameter
and FLOPs counts, and its extra validation metrics. The model, the objective, the sampler, the
eval stage and the FLOPs counts consult the entry instead of switching on the head's name, so a
third head is one new entry here (plus its name in choices.CHOICES["model.image_head"]) and its
tests.

Why the entry travels inside the typed config (ModelConfig.head) rather than being looked up:
this registry imports the objective, the sampler and the FLOPs helpers, and the sampler imports
the model, so the model (and anything under mmjax/models/) must not import this module. The one
lookup by name happens in config_validation.model_block, which builds the ModelConfig; the model,
the objective and the sampler then call `cfg.head.<...>` without importing anything. Import
order: models/ <- objectives, sampling, flops <- image_heads <- config_validation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp

from mmjax import flops, objectives, sampling
from mmjax.choices import CHOICES
from mmjax.models import heads


@dataclasses.dataclass(frozen=True, repr=False)
class ImageHead:
    """One image head. Every callable takes the ModelConfig `cfg` (or the model holding it).

    module(cfg, dtype) -> the flax module, created in MultimodalLM.setup as attribute `attr`;
    init_outputs(model, hidden, batch) -> an output that touches every head parameter (init);
    loss_terms(model, variables, hidden, batch, rng, objective, slots) -> (image loss, metrics),
        with metrics["image_loss"] (objectives.compute_losses adds text CE and the weights); the
        head runs only at `slots` (targets.Slots: the image-target positions, or all of them);
    sample_token(decoder, hidden, keys, cfg_scale) -> (FSQ index [B], code vector [B, d]) of the
        next image token (sampling.Decoder; hidden [G*B, D], cond rows first when guided; the
        token's guidance scale, sampling.cfg_scale_at);
    param_count(cfg) -> parameters; flops_per_position(cfg) -> forward FLOPs per image-target
        position (flops.py conventions);
    val_metrics(mean image loss) -> extra validation metrics (eval stage, t2i rows);
    temperature_field: the SampleSettings field a user's image "temperature" sets (mmjax.api).
    """

    name: str
    attr: str
    module: Callable
    init_outputs: Callable
    loss_terms: Callable
    sample_token: Callable
    param_count: Callable
    flops_per_position: Callable
    val_metrics: Callable
    temperature_field: str

    def __repr__(self) -> str:
        return f"ImageHead({self.name!r})"


def _flow_counts(cfg):
    return flops.flow_head_counts(cfg.d_model, cfg.code_dim, cfg.flow_width, cfg.flow_depth)


def _flow_flops(cfg) -> float:
    _, per_position, per_sample = _flow_counts(cfg)
    return per_position + cfg.flow_t_samples * per_sample


def _flow_init(model, hidden, batch):
    x = batch["codes"].astype(jnp.float32)
    return model.apply_image_head(hidden, x, jnp.zeros(x.shape[:-1]))


FLOW = ImageHead(
    name="flow", attr="flow_head",
    module=lambda cfg, dtype: heads.FlowHead(cfg.code_dim, cfg.flow_width, cfg.flow_depth, dtype),
    init_outputs=_flow_init,
    loss_terms=objectives.flow_terms,
    sample_token=sampling.flow_token,
    param_count=lambda cfg: _flow_counts(cfg)[0],
    flops_per_position=_flow_flops,
    val_metrics=lambda mean: {},
    temperature_field="flow_temperature",
)

DISCRETE = ImageHead(
    name="discrete", attr="index_head",
    module=lambda cfg, dtype: heads.IndexHead(cfg.fsq_levels, cfg.discrete_factorized, dtype),
    init_outputs=lambda model, hidden, batch: model.apply_image_head(hidden),
    loss_terms=objectives.discrete_terms,
    sample_token=sampling.discrete_token,
    param_count=lambda cfg: flops.discrete_head_counts(
        cfg.d_model, cfg.fsq_levels, cfg.discrete_factorized)[0],
    flops_per_position=lambda cfg: flops.discrete_head_counts(
        cfg.d_model, cfg.fsq_levels, cfg.discrete_factorized)[1],
    val_metrics=lambda mean: {"val_t2i_bits_per_code": mean / math.log(2.0)},
    temperature_field="image_temperature",
)

HEADS: dict[str, ImageHead] = {head.name: head for head in (FLOW, DISCRETE)}
if tuple(HEADS) != CHOICES["model.image_head"]:
    raise ImportError(f"image_heads.HEADS {tuple(HEADS)} and choices.CHOICES['model.image_head'] "
                      f"{CHOICES['model.image_head']} must name the same heads")


def get(name: str) -> ImageHead:
    """The registry entry of `model.image_head` (config_validation checked the name)."""
    return HEADS[name]
