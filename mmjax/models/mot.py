"""Mixture-of-Transformers (Liang et al. 2024): every non-embedding weight is split by modality,
attention stays global over the mixed sequence.

Grouped compute: tokens are sorted by modality id so that each modality's tokens are contiguous,
and one `jax.lax.ragged_dot` multiplies every group by its own weight slice. A token therefore
costs exactly what it costs in a dense model; nothing runs through another modality's weights.
On CPU, XLA lowers `ragged_dot` to a masked dense matmul (M times the FLOPs), and on one H200 it
took 1.6x a dense matmul of the same rows, so `mot_impl="auto"` (`resolve_impl`) avoids it for
training. For packed training rows of two modalities it uses static buckets on CPU and GPU
(`make_bucket_routing`): the packer bounds the image tokens per row, padding fills whichever
bucket has room, so each shard splits at a fixed row into a text block and an image block and
each modality is one dense matmul (1.02-1.09x a dense step on 2 CPU cores,
bench/mot_overhead.py).
Elsewhere on CPU (decode chunks, three modalities, unknown capacity) it uses `tiled_grouped_matmul`:
the sorted layout is padded so that each group starts on a tile boundary, and one batched matmul
over tiles gives every tile its group's weight (dense cost plus at most M - 1 tiles; measured
1.3-1.45x a dense step on 2 CPU cores, where batched small matmuls are slower than one big one).
`mot_impl="masked"` does run every token through every modality and keeps its own; it exists
only as a reference for tests and benchmarks.

Where the sort happens, and why: the modality layout is fixed for a whole forward pass, so the
model sorts ONCE (`make_routing`) and keeps the residual stream in sorted order through every
block (padded to tiles for 'tiled'). Norms, Q/K/V/O and the FFN then need no data movement at
all; only attention needs the original order (RoPE positions, causal mask), so each block
un-sorts q/k/v and re-sorts the attention output: 4 * d_model gathered values per token per
layer, against 8 * d_model if the residual were kept in the original order and sorted around
each projection group. The final hidden state is un-sorted once. With one modality the permutation is the identity and is skipped
(statically), so `num_modalities=1` is a plain dense transformer with no gathers at all.

Where the sort runs on a mesh: 'tiled' and 'masked' sort inside each data x fsdp batch shard
(`routing_shards`), so every gather stays on its own device. 'ragged' sorts the flattened batch
globally ([B*L] rows: `ragged_dot` takes one 2-D left operand), so under data parallelism XLA adds
collectives around its gathers; on one device (and in every test) the two are the same.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmjax.choices import CHOICES
from mmjax.models import attention, kv_cache, layers


class Routing(NamedTuple):
    """How tokens are grouped by modality (computed once per forward).

    Tokens are sorted within each of S batch shards (S = the data x fsdp mesh size when a mesh is
    set, else 1), so under data parallelism every gather stays on its own device. perm / inv are
    None when there is a single modality (identity, skipped statically).

    For 'tiled' the sorted layout is also *padded*: each group starts on a tile boundary and
    R = (ceil(n / tile) + M - 1) * tile rows per shard (zero rows fill the gaps), so every tile
    holds one modality and the grouped matmuls need no data movement of their own; `tile_group`
    is set then (None otherwise) and the tile size is R // tile_group.shape[1].
    """

    perm: jax.Array | None  # [S, R] int32: sorted row r of shard s holds token perm[s, r] (n: pad)
    inv: jax.Array | None  # [S, n] int32: token j of shard s sits at sorted row inv[s, j]
    group_sizes: jax.Array  # [S, M] int32 tokens per modality and shard (what ragged_dot needs)
    modality: jax.Array  # [S * R] int32 modality id of each *sorted* row (pad rows: their tile's)
    tile_group: jax.Array | None = None  # [S, R // tile] int32 modality of each tile ('tiled')
    # 'buckets' (make_bucket_routing): [C_s] int32 0..C_s-1, the image bucket's rows at the end
    # of each shard (its static LENGTH is the bucket size; an array so it survives tracing)...
    image_bucket: jax.Array | None = None
    overflow: jax.Array | None = None  # ... and [B] bool: rows of a shard that overflowed it


def routing_shards(batch_size: int, impl: str) -> int:
    """Batch shards to sort within: the mesh's data x fsdp size (dividing `batch_size`).

    'ragged' sorts globally (1 shard): `ragged_dot` cannot be vmapped over shards that share one
    weight, so under data parallelism its un-sort gathers cross devices (XLA inserts the
    collectives); 'tiled' and 'masked' keep every gather on its own device.
    """
    if impl != "buckets" and resolve_impl(impl) == "ragged":  # buckets sort per shard too
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    shape = dict(mesh.shape)
    return math.gcd(int(shape.get("data", 1)) * int(shape.get("fsdp", 1)), int(batch_size))


def bucket_blocks(batch_size: int, bucket_rows: int, shards: int) -> int:
    """Row blocks the static buckets sort within: the `shards` data shards when each holds whole
    bucket groups (every `bucket_rows` consecutive rows obey the bound only together), else one
    block per group, which stays exact when a group straddles two devices (its gathers then
    cross them)."""
    if batch_size % bucket_rows:
        raise ValueError(f"a batch of {batch_size} rows does not split into bucket groups of "
                         f"{bucket_rows} rows (objective.direction_group_rows must divide every batch)")
    return shards if (batch_size // shards) % bucket_rows == 0 else batch_size // bucket_rows


def make_routing(modality: jax.Array, num_modalities: int, shards: int = 1,
                 tile: int | None = None) -> Routing:
    """Stable sort of each batch shard's tokens by modality id (padded to whole tiles if `tile`).

    With one modality every token shares the one weight set (a dense model still sees text and
    image tokens; only the input embedding tells them apart). Otherwise ids outside
    [0, num_modalities) are clipped here (ragged_dot needs group sizes that sum to N) and the
    model turns such positions into NaN, so a bad batch cannot train silently.
    """
    n = modality.size // shards
    if num_modalities == 1:
        return Routing(None, None, jnp.full((shards, 1), n, jnp.int32),
                       jnp.zeros((modality.size,), jnp.int32))
    ids = jnp.clip(modality.reshape(shards, n).astype(jnp.int32), 0, num_modalities - 1)
    perm = jnp.argsort(ids, axis=-1, stable=True).astype(jnp.int32)
    inv = jnp.argsort(perm, axis=-1).astype(jnp.int32)
    group_sizes = jax.vmap(lambda r: jnp.bincount(r, length=num_modalities))(ids).astype(jnp.int32)
    if tile is None:
        return Routing(perm, inv, group_sizes, jnp.take_along_axis(ids, perm, axis=-1).reshape(-1))
    pad = functools.partial(_pad_to_tiles, num_modalities=num_modalities, tile=tile)
    perm, inv, row_group = jax.vmap(pad)(perm, inv, ids, group_sizes)
    return Routing(perm, inv, group_sizes, row_group.reshape(-1), row_group[:, ::tile])


def make_bucket_routing(modality: jax.Array, real: jax.Array, image_capacity: int,
                        shards: int = 1) -> Routing:
    """Two modalities in static buckets: each batch shard's B_s x T tokens are sorted to
    [text | padding | image] and split at B_s (T - C) (C = `image_capacity` per row), so the
    first B_s (T - C) sorted rows take the text weights and the last B_s C the image weights,
    with two contiguous slices.

    Why: the packer bounds the image tokens of a row (`image_capacity`, from its layout; the
    first-fit packer bounds them over a group of rows, which `bucket_blocks` keeps in one shard), and
    padding (`real` False: segment 0) belongs to no modality, so it can fill whichever bucket has
    room: real text lands in [0, n_text) and real images in [n - n_image, n), inside their
    buckets whenever the shard holds n_text <= B_s (T - C) and n_image <= B_s C, which every row
    obeying its bound guarantees. Every modality is then ONE dense matmul over a contiguous block
    of rows (no tile padding, no per-tile weight copies, nothing run twice; per-row buckets would
    be strided slices, which XLA:CPU copies), so MoT costs a dense model plus the sort's gathers.
    Padding may meet either weight; nothing attends to it and it carries no target. A shard over
    its buckets is flagged in `overflow` (per row; the model turns those rows into NaN: never
    silently wrong).
    """
    b, t = modality.shape
    rows = b // shards
    ids = jnp.clip(modality.astype(jnp.int32), 0, 1).reshape(shards, rows * t)
    real = real.reshape(shards, rows * t)
    key = jnp.where(real, 2 * ids, 1)  # text 0, padding 1, image 2
    perm = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    inv = jnp.argsort(perm, axis=-1).astype(jnp.int32)
    image_rows = rows * image_capacity
    n_image = jnp.sum(real & (ids == 1), axis=-1)
    n_text = jnp.sum(real & (ids == 0), axis=-1)
    over = (n_image > image_rows) | (n_text > rows * t - image_rows)  # [S]
    sorted_modality = jnp.broadcast_to(
        (jnp.arange(rows * t) >= rows * t - image_rows).astype(jnp.int32), (shards, rows * t))
    group_sizes = jnp.broadcast_to(jnp.array([rows * t - image_rows, image_rows], jnp.int32),
                                   (shards, 2))
    return Routing(perm, inv, group_sizes, sorted_modality.reshape(-1),
                   image_bucket=jnp.arange(image_rows, dtype=jnp.int32),
                   overflow=jnp.repeat(over, rows))


def bucketed_matmul(x: jax.Array, kernel: jax.Array, image_rows: int, shards: int) -> jax.Array:
    """x [S * n, K] in bucket layout (`make_bucket_routing`) times kernel [2, K, F]: the first
    n - image_rows rows of each shard with kernel[0], the last image_rows with kernel[1].

    The two products are written into one buffer with dynamic_update_slice rather than
    concatenated: XLA:CPU then writes each matmul in place, where a concatenate (and its
    transpose, two pads and an add) copied every output: 1.39x a dense step against 1.02x
    (demo, discrete head; the same FLOPs).
    """
    per_shard = x.reshape(shards, -1, x.shape[-1])
    split = per_shard.shape[1] - image_rows
    out = jnp.zeros(per_shard.shape[:2] + kernel.shape[-1:], jnp.result_type(x, kernel))
    for start, rows, weight in ((0, per_shard[:, :split], kernel[0]),
                                (split, per_shard[:, split:], kernel[1])):
        # 2-D matmuls: a [S, n, K] x [K, F] product runs ~1.6x slower on XLA:CPU than the same
        # rows flattened (with one shard the flattening is free)
        y = (rows.reshape(-1, rows.shape[-1]) @ weight).reshape(rows.shape[:2] + (-1,))
        out = jax.lax.dynamic_update_slice(out, y, (0, start, 0))
    return out.reshape(x.shape[0], -1)


def _pad_to_tiles(perm, inv, ids, group_sizes, *, num_modalities: int, tile: int):
    """One shard's sort, re-laid so that each group starts on a tile boundary.

    sum_m ceil(g_m / tile) <= ceil(n / tile) + M - 1 gives a static number of tiles.
    Returns (perm [R] with n for pad rows, inv [n] into the padded rows, group of each row [R]).
    """
    n, m = perm.shape[0], num_modalities
    rows = jnp.arange((-(-n // tile) + m - 1) * tile, dtype=jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    padded_sizes = (group_sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes
    row_group = jnp.minimum(jnp.searchsorted(padded_ends, rows, side="right"), m - 1)
    offset = rows - padded_starts[row_group]
    real = offset < group_sizes[row_group]
    padded_perm = jnp.where(real, perm[jnp.where(real, starts[row_group] + offset, 0)], n)
    padded_inv = inv - starts[ids] + padded_starts[ids]
    return (padded_perm.astype(jnp.int32), padded_inv.astype(jnp.int32),
            row_group.astype(jnp.int32))


@jax.custom_vjp
def move_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """y[i] = x[index[i]] (index == len(x) gives a zero row), for a one-to-one row mapping.

    `inverse[j]` is the row of y that holds x[j] (len(y) if none). Why a custom VJP: the plain
    gather's transpose is a scatter-add, which XLA runs row by row on CPU; for a one-to-one
    mapping the gradient is just the inverse gather.
    """
    return _take_rows(x, index)


def _take_rows(x, index):
    padded = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
    return jnp.take(padded, index, axis=0, mode="clip")


def _move_rows_fwd(x, index, inverse):
    return _take_rows(x, index), (index, inverse)


def _move_rows_bwd(res, g):
    index, inverse = res
    return _take_rows(g, inverse), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _per_shard(x: jax.Array, shards: int) -> jax.Array:
    return x.reshape((shards, -1) + x.shape[1:])


def to_sorted(x: jax.Array, routing: Routing) -> jax.Array:
    """Original-order tokens [B, T, ...] -> sorted rows [N, ...]."""
    flat = x.reshape((-1,) + x.shape[2:])
    if routing.perm is None:
        return flat
    moved = jax.vmap(move_rows)(_per_shard(flat, routing.perm.shape[0]), routing.perm, routing.inv)
    return moved.reshape((-1,) + flat.shape[1:])


def sorted_layout(x: jax.Array, routing: Routing, batch: int, length: int) -> jax.Array:
    """Sorted rows [N, D] -> the 3-D layout blocks carry between them (shardable on its first
    axis): [B, T, D], or [S, R, D] when padded to tiles or in buckets (each shard's rows stay
    together)."""
    if routing.tile_group is None and routing.image_bucket is None:
        return x.reshape(batch, length, x.shape[-1])
    return x.reshape(routing.perm.shape[0], -1, x.shape[-1])


def from_sorted(x: jax.Array, routing: Routing, shape: Sequence[int]) -> jax.Array:
    """Sorted rows [N, ...] -> original order, reshaped to `shape` ([B, T, ...])."""
    if routing.inv is None:
        return x.reshape(tuple(shape))
    moved = jax.vmap(move_rows)(_per_shard(x, routing.inv.shape[0]), routing.inv, routing.perm)
    return moved.reshape(tuple(shape))


def tiled_grouped_matmul(x: jax.Array, kernel: jax.Array, tile_group: jax.Array) -> jax.Array:
    """x [S * R, K] (rows sorted by group AND padded to whole tiles, see `make_routing`) times
    kernel [M, K, F], each tile with its group's weight.

    Why: XLA's CPU lowering of `ragged_dot` is a masked dense matmul (M times the FLOPs). With the
    padded layout every tile belongs to one group, so one batched matmul over tiles does it: dense
    cost plus at most M - 1 tiles per shard, and no gathers (the routing's one sort did them).
    """
    shards, num_tiles = tile_group.shape
    tiles = x.reshape(shards, num_tiles, -1, x.shape[-1])
    tile_kernel = take_weights(kernel, tile_group.reshape(-1)).reshape(
        (shards, num_tiles) + kernel.shape[1:])
    return jnp.einsum("stbk,stkf->stbf", tiles, tile_kernel).reshape(x.shape[0], -1)


@jax.custom_vjp
def take_weights(kernel: jax.Array, index: jax.Array) -> jax.Array:
    """kernel[index] for a few rows of a small [M, ...] table.

    Why custom: the gather's own gradient is a scatter-add, which XLA runs row by row on CPU, and
    a one-hot einsum forward is a badly shaped contraction (M is tiny); here the forward is a
    plain gather and the gradient one matmul, one_hot(index)^T @ g.
    """
    return jnp.take(kernel, index, axis=0)


def _take_weights_fwd(kernel, index):
    return jnp.take(kernel, index, axis=0), (index, kernel.shape[0])


def _take_weights_bwd(res, g):
    index, m = res
    one_hot = jax.nn.one_hot(index, m, dtype=g.dtype)
    return (one_hot.T @ g.reshape(g.shape[0], -1)).reshape((m,) + g.shape[1:]), None


take_weights.defvjp(_take_weights_fwd, _take_weights_bwd)


IMPLS = CHOICES["model.mot_impl"]


def resolve_impl(impl: str, rows: int | None = None, tile: int = 128,
                 buckets_fit: bool = False, backend: str | None = None) -> str:
    """'auto' -> the grouped-compute path for this backend (default: jax's default backend).

    - Calls the static buckets fit (`buckets_fit`: packed rows of a layout with a known image
      capacity, two modalities): 'buckets' on CPU and GPU, two dense matmuls per projection. On
      one H200 (jax 0.11.2) `ragged_dot` at the 1b FFN shape (32768 x 2048 -> 5632, 2 groups)
      took 1.6x a dense matmul of the same rows (2.29 vs 1.43 ms, the cuDNN ragged-dot fusion
      flag changed nothing) and the tiled path 4.3x (bench/results/accelerator/ragged_dot.json);
      on CPU ragged is M x dense and tiled 1.3-1.45x a dense step.
    - Otherwise 'ragged' on GPU/TPU (TPU: not measured here, XLA has a grouped kernel there);
      on CPU 'tiled', except for calls with fewer than `tile` rows (a KV-cache decode step):
      'tiled' pads every group to a whole tile (up to M x tile rows), 'ragged''s masked matmul
      costs M x rows, so below one tile 'ragged' is the cheaper of the two (bench/decode.py).
    'buckets' asked for where they do not fit (a decode chunk) is 'auto''s choice without them.
    `rows` is static (the call's B x T; at least that when padded), so the model's routing and
    every layer's choice agree.
    """
    backend = backend or jax.default_backend()
    if impl == "buckets":
        return "buckets" if buckets_fit else resolve_impl("auto", rows, tile, backend=backend)
    if impl != "auto":
        return impl
    if buckets_fit and backend in ("cpu", "gpu"):
        return "buckets"
    if backend != "cpu":
        return "ragged"
    return "ragged" if rows is not None and rows < tile else "tiled"


class ModalityDense(nn.Module):
    """A linear map with one weight per modality: kernel [M, *in_shape, *features], no bias.

    Applied to sorted rows x [N, prod(in_shape)] -> [N, prod(features)], each row with the weight
    of its own modality. The multi-axis shapes exist only to name axes (`heads`, `kv`, ...).
    """

    num_modalities: int
    in_shape: tuple[int, ...]
    features: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    tile: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
        m, n_in, n_out = self.num_modalities, len(self.in_shape), len(self.features)
        init = layers.fan_in_init(in_axis=tuple(range(1, 1 + n_in)),
                                  out_axis=tuple(range(1 + n_in, 1 + n_in + n_out)),
                                  batch_axis=(0,))
        kernel = self.param("kernel", layers.partitioned(
            init, ("modality",) + tuple(self.in_names) + tuple(self.out_names)),
            (m,) + tuple(self.in_shape) + tuple(self.features), jnp.float32)
        kernel = kernel.reshape(m, math.prod(self.in_shape), math.prod(self.features))
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        if m == 1:
            return x @ kernel[0]
        if routing.image_bucket is not None:  # the model chose 'buckets' for this call
            return bucketed_matmul(x, kernel, routing.image_bucket.shape[0],
                                   routing.perm.shape[0])
        impl = resolve_impl(self.impl, x.shape[0], self.tile)
        shards = routing.group_sizes.shape[0]
        if impl == "ragged":
            if shards != 1:
                raise ValueError("mot_impl='ragged' needs one routing shard (ragged_dot cannot be "
                                 "vmapped over shards with shared weights); see routing_shards()")
            return jax.lax.ragged_dot(x, kernel, routing.group_sizes[0])
        if impl == "tiled":
            if routing.tile_group is None:
                raise ValueError("mot_impl='tiled' needs rows padded to tiles: "
                                 "make_routing(..., tile=model.mot_tile)")
            return tiled_grouped_matmul(x, kernel, routing.tile_group)
        if impl == "masked":  # reference: M times the FLOPs
            every = jnp.einsum("nk,mkf->nmf", x, kernel)
            return jnp.take_along_axis(every, routing.modality[:, None, None], axis=1)[:, 0]
        raise ValueError(f"model.mot_impl={self.impl!r}: must be one of {IMPLS}.")


class ModalityRMSNorm(nn.Module):
    """RMSNorm whose scale is picked per row by modality (a cheap gather of [M, D] scales)."""

    num_modalities: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
        scale = self.param("scale", layers.partitioned(nn.initializers.ones, ("modality", "embed")),
                           (self.num_modalities, x.shape[-1]), jnp.float32)
        if self.num_modalities == 1:
            row_scale = scale[0]
        else:  # one-hot matmul: its gradient is a matmul, where a gather's is a scatter-add
            row_scale = jax.nn.one_hot(routing.modality, self.num_modalities) @ scale
        return (layers.rms_normalize(x, self.eps) * row_scale).astype(self.dtype)


class MoTBlock(nn.Module):
    """Pre-norm transformer block, every weight per modality, global attention.

    x: the sorted residual stream (`sorted_layout`: [B, T, D], or [S, R, D] when padded to tiles);
    RoPE positions [B, T] (or [B, T, A]: layers.rope) / mask in original order; `mask` is an
    attention.MaskSpec (attended with `attention_impl`) or a dense bool [B, T, S] mask.
    With `kv` = (cache_k, cache_v) [B, H, S, Dh] (decode; `mask` is attention.decode_spec's), the
    chunk attends to the cache and its keys/values are written at slots mask.kv_len - T..
    (models/kv_cache.py). Returns (x, updated (k, v) or None).
    """

    num_modalities: int
    d_model: int
    num_heads: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    mot_impl: str = "auto"
    mot_tile: int = 128
    attention_impl: str = "reference"  # model.attention_impl (used when `mask` is a MaskSpec)
    attention_block: int = 512  # model.attention_block

    def _dense(self, in_shape, features, in_names, out_names, name):
        return ModalityDense(self.num_modalities, tuple(in_shape), tuple(features), tuple(in_names),
                             tuple(out_names), dtype=self.dtype, impl=self.mot_impl,
                             tile=self.mot_tile, name=name)

    @nn.compact
    def __call__(self, x, routing: Routing, positions, mask, kv=None):
        layout = x.shape
        batch, length = positions.shape[:2]
        d = layout[-1]
        heads = self.num_heads
        head_dim = d // heads
        x = layers.constrain(x, ("batch", "length", "embed")).reshape(-1, d)

        h = ModalityRMSNorm(self.num_modalities, self.norm_eps, self.dtype, name="attn_norm")(
            x, routing)
        qkv = []
        for name in ("query", "key", "value"):
            y = self._dense((d,), (heads, head_dim), ("embed",), ("heads", "kv"), name)(h, routing)
            y = from_sorted(y, routing, (batch, length, heads, head_dim))
            qkv.append(layers.constrain(y, ("batch", "length", "heads", "kv")))
        q, k, v = qkv
        q = layers.rope(q, positions, self.rope_theta)
        k = layers.rope(k, positions, self.rope_theta)
        new_kv = None
        k, v = k.astype(self.dtype), v.astype(self.dtype)
        if kv is not None:  # decode (head-major cache)
            o, new_kv = kv_cache.attend_then_write(q, k, v, kv[0], kv[1], mask,
                                                   self.attention_impl, self.attention_block)
        elif isinstance(mask, attention.MaskSpec):  # built per tile by the chosen implementation
            o = attention.attend(q, k, v, mask, self.attention_impl, self.attention_block)
        else:  # a dense bool mask [B, T, S]
            o = layers.attend(q, k, v, mask)
        o = to_sorted(o.reshape(batch, length, heads * head_dim), routing)
        x = x + self._dense((heads, head_dim), (d,), ("heads", "kv"), ("embed",), "out")(o, routing)

        h = ModalityRMSNorm(self.num_modalities, self.norm_eps, self.dtype, name="mlp_norm")(
            x, routing)
        gate = self._dense((d,), (self.mlp_dim,), ("embed",), ("mlp",), "gate")(h, routing)
        up = self._dense((d,), (self.mlp_dim,), ("embed",), ("mlp",), "up")(h, routing)
        x = x + self._dense((self.mlp_dim,), (d,), ("mlp",), ("embed",), "down")(
            layers.swiglu(gate, up), routing)
        x = layers.constrain(x.reshape(layout), ("batch", "length", "embed"))
        return x, new_kv
