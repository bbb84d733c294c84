"""Gather the positions that carry a loss target to a static capacity, so the heads run only there.

Why: the LM head, the flow head (x model.flow_t_samples) and the FSQ-index head used to run on
every position of a packed row (text, context images, padding) and be masked afterwards. A packed
row of `PackedDataset` can hold at most `TargetCapacity.image` image targets and
`TargetCapacity.text` text targets (mmjax.data.packing.row_target_capacity derives both from the
packer's layout; config_validation.target_capacity builds this block from a config), so the
objective gathers each row's target positions, in position order, into that many slots
(`select`), runs the head on [B, capacity] instead of [B, T], and takes the same weighted mean:
the loss and its gradients equal the all-positions masked ones (tests/test_targets.py). Empty
slots point at position 0 with weight 0.

Image targets are gathered per group of `TargetCapacity.group` consecutive rows laid end to end:
the packer fixes how many text->image documents a group holds (up to one; objective.
direction_group_rows, packing.draw_direction), so a group needs room for ceil(t2i_prob x its
documents) images where per-row slots would need one image per document: the image-to-caption
rows' empty image slots were a third of the flow head's work at the demo size.

A row with more targets than its capacity: raised (ValueError naming the config fields) where the
mask is concrete; under jit the loss becomes NaN and `overflow` counts the excess targets.
Dropping the excess instead was rejected: the packer cannot exceed the bound by construction, so
an overflow means rows from another layout than the config says (a mismatched data.max_caption_len,
image size or model.max_seq_len, or hand-made rows) -- a bug, not a rare event to tolerate. Dropped
targets would silently bias the loss toward early positions; a NaN loss is never applied to the
params (train.py) and stops the run under train.nan_policy="stop".
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CAPACITY_FIELDS = ("data.max_caption_len, data.image_size / fsq.channels, model.max_seq_len, "
                   "objective.t2i_prob, objective.direction_group_rows, data.packing, "
                   "data.row_image_slots")


@dataclasses.dataclass(frozen=True)
class TargetCapacity:
    """Most image-target positions a group of `group` consecutive packed rows holds, and most
    text-target positions one row holds (static shapes). Groups: the packer stratifies the
    directions of caption/image pairs over `group` rows (packing.draw_direction), so their image
    targets are bounded per group far more tightly than `group` x the one-row bound."""

    image: int
    text: int
    group: int = 1


class Slots(NamedTuple):
    """Where a head runs: `index` [B / group, C] positions in each group of `group` rows laid end
    to end (None: every position, no gather), `weight` the mask value at each slot (0 in empty
    slots), `overflow` [] targets that did not fit."""

    index: jax.Array | None
    weight: jax.Array
    overflow: jax.Array
    group: int = 1

    def take(self, x: jax.Array, axis: int = 1) -> jax.Array:
        """x [..., B, T, ...] (batch at axis - 1, positions at `axis`) -> [..., B / group, C, ...]."""
        if self.index is None:
            return x
        x = _grouped(jnp.asarray(x), axis, self.group)
        idx = self.index.reshape((1,) * (axis - 1) + self.index.shape
                                 + (1,) * (x.ndim - axis - 1))
        return jnp.take_along_axis(x, idx, axis=axis)


def _grouped(x: jax.Array, axis: int, group: int) -> jax.Array:
    """x [..., B, T, ...] (positions at `axis`) -> [..., B / group, group * T, ...]: each group
    of consecutive rows end to end (a reshape: rows stay on their data shard when every shard
    holds whole groups)."""
    if group == 1:
        return x
    b, t = x.shape[axis - 1], x.shape[axis]
    if b % group:
        raise ValueError(f"a batch of {b} rows does not split into groups of {group} rows "
                         "(objective.direction_group_rows must divide every batch)")
    return x.reshape(x.shape[:axis - 1] + (b // group, group * t) + x.shape[axis + 1:])


def select(mask: jax.Array, capacity: int | None, what: str, group: int = 1) -> Slots:
    """The first `capacity` positions of each group of `group` consecutive rows where mask > 0,
    in position order (group 1: of each row).

    mask [B, T] (0/1 or weights); capacity None keeps every position (the reference path);
    `what` names the targets in the error ("image" / "text").
    """
    weight = jnp.asarray(mask).astype(jnp.float32)
    if capacity is None:
        return Slots(None, weight, jnp.zeros((), jnp.int32))
    weight = _grouped(weight, 1, int(group))
    mask = mask if isinstance(mask, jax.core.Tracer) else _grouped(np.asarray(mask), 1, int(group))
    b, t = weight.shape
    c = min(int(capacity), t)
    has = weight > 0
    count = jnp.sum(has, axis=1, dtype=jnp.int32)
    if not isinstance(mask, jax.core.Tracer):
        most = int(np.max(np.sum(np.asarray(mask) > 0, axis=1), initial=0))
        if most > c:
            where = "a packed row" if group == 1 else f"a group of {group} packed rows"
            raise ValueError(f"{where} holds {most} {what} targets, more than the static "
                             f"capacity {c} that {CAPACITY_FIELDS} allow "
                             "(mmjax.data.packing.row_target_capacity, group_image_targets)")
    # Target j of a row goes to slot j (its rank); the rest are dropped by the scatter.
    rank = jnp.cumsum(has, axis=1, dtype=jnp.int32) - 1
    slot = jnp.where(has & (rank < c), rank, c)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    index = jnp.zeros((b, c), jnp.int32).at[rows, slot].set(positions, mode="drop")
    filled = jnp.arange(c, dtype=jnp.int32)[None, :] < count[:, None]
    weight = jnp.where(filled, jnp.take_along_axis(weight, index, axis=1), 0.0)
    overflow = jnp.sum(jnp.maximum(count - c, 0))
    return Slots(index, weight, overflow, int(group))
