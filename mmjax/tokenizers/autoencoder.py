"""Conv autoencoder around FSQ: the image tokenizer (Flax Linen, pure, no I/O).

encoder: [pixel-unshuffle by `patch_size`] conv stem -> per resolution [2x strided-conv
downsample (all but the first), residual blocks (GroupNorm + swish)] -> GroupNorm, swish, 1x1
conv to `dim = len(levels)` channels.
FSQ: bound + round with a straight-through gradient (`mmjax.tokenizers.fsq`).
decoder: the mirror image, upsampling by nearest-neighbour resize + 3x3 conv, the last conv
making `3 * patch_size**2` channels that pixel-shuffle back to RGB.

Each entry of `channels` beyond the first halves the resolution, so a 32x32 image with
`channels=(32, 64, 64)` becomes an 8x8 grid of FSQ codes (64 image tokens). `patch_size=2` folds
each 2x2 pixel block into 12 channels before the first conv instead (space-to-depth, the
patchify stem of ViT-style tokenizers), so there is no full-resolution level at all: on CPU that
level costs far more of a step than its FLOPs share, because XLA runs the backward pass of a
narrow 3x3 convolution slowly (`python -m bench.tokenizer_width`).

Pixels are float in [-1, 1] inside the model (`images_to_float` / `float_to_images` convert from
and to uint8). The decoder's last conv is linear: `__call__` returns the *unclipped* output so
the loss still has gradients on saturated pixels (flat black/white backgrounds); `decode` clips
to [-1, 1], the pixel range.

Every parameter carries logical axis names (`conv_h`, `conv_w`, `conv_in`, `conv_out`; the
code-width output of the encoder is `code` and the RGB output of the decoder is `pixel`), so
placement is decided by the rules table in `mmjax.parallel` alone. There is no codebook or
commitment loss: FSQ has nothing to learn.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.choices import CHOICES
from mmjax.tokenizers.fsq import FSQ

LOSS_TYPES = CHOICES["fsq.loss"]


# ---- pixel conversion ------------------------------------------------------------------------
def images_to_float(images):
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1] (numpy in, numpy out; jax likewise)."""
    xp = jnp if isinstance(images, jax.Array) else np
    images = xp.asarray(images)
    if images.dtype != xp.uint8:
        raise ValueError(f"images_to_float: images must be uint8, got dtype {images.dtype}.")
    return images.astype(xp.float32) / xp.float32(127.5) - xp.float32(1.0)


def float_to_images(x):
    """float in [-1, 1] (values outside are clipped) -> uint8 [0, 255], rounded to nearest."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.clip(xp.asarray(x, xp.float32), -1.0, 1.0)
    return xp.round((x + 1.0) * 127.5).astype(xp.uint8)


DOWNSAMPLE_RULE = "fsq.patch_size * 2**(len(fsq.channels)-1)"  # what downsample_factor computes


def downsample_factor(channels: Sequence[int], patch_size: int = 1) -> int:
    """Pixels per token side: the pixel-unshuffle's `patch_size` times one 2x per width beyond
    the first. The one home of that rule (config validation, the stages and the API read it)."""
    return int(patch_size) * 2 ** (len(channels) - 1)


def space_to_depth(x, patch: int):
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p pixel block becomes one position's channels
    (row-major within the block, then C), the inverse of `depth_to_space`."""
    if patch == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x, patch: int):
    """[B, h, w, p*p*C] -> [B, h*p, w*p, C]: the inverse of `space_to_depth`."""
    if patch == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, patch, patch, c // (patch * patch)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, c // (patch * patch))


# ---- layers with logical axis names ------------------------------------------------------------
def _conv(features: int, kernel: int, strides: int = 1, *, in_name: str = "conv_in",
          out_name: str = "conv_out", zero_init: bool = False, name: str | None = None) -> nn.Conv:
    kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding="SAME",
        kernel_init=nn.with_logical_partitioning(kernel_init, ("conv_h", "conv_w", in_name, out_name)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_name,)),
        name=name)


def _norm(groups: int, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name)


class ResBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))); the second conv starts at zero (identity block)."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.features, 3)(nn.swish(_norm(self.groups)(x)))
        h = _conv(self.features, 3, zero_init=True)(nn.swish(_norm(self.groups)(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, name="skip")(x)
        return x + h


class Encoder(nn.Module):
    """float images [B, H, W, 3] -> pre-quantisation latents [B, H/f, W/f, dim],
    f = downsample_factor(channels, patch_size)."""

    channels: Sequence[int]
    num_res_blocks: int
    dim: int
    groups: int
    patch_size: int = 1

    @nn.compact
    def __call__(self, x):
        x = space_to_depth(x, self.patch_size)
        x = _conv(self.channels[0], 3, in_name="pixel", name="stem")(x)
        for level, width in enumerate(self.channels):
            if level > 0:
                x = _conv(width, 3, strides=2, name=f"down_{level}")(x)
            for i in range(self.num_res_blocks):
                x = ResBlock(width, self.groups, name=f"res_{level}_{i}")(x)
        x = nn.swish(_norm(self.groups, name="norm_out")(x))
        return _conv(self.dim, 1, out_name="code", name="to_code")(x)


class Decoder(nn.Module):
    """FSQ codes [B, h, w, dim] -> unclipped float images [B, h*f, w*f, 3]."""

    channels: Sequence[int]
    num_res_blocks: int
    groups: int
    patch_size: int = 1

    @nn.compact
    def __call__(self, z):
        x = _conv(self.channels[-1], 3, in_name="code", name="from_code")(z)
        for level in reversed(range(len(self.channels))):
            for i in range(self.num_res_blocks):
                x = ResBlock(self.channels[level], self.groups, name=f"res_{level}_{i}")(x)
            if level > 0:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
                x = _conv(self.channels[level - 1], 3, name=f"up_{level}")(x)
        x = nn.swish(_norm(self.groups, name="norm_out")(x))
        x = _conv(3 * self.patch_size ** 2, 3, out_name="pixel", name="to_pixel")(x)
        return depth_to_space(x, self.patch_size)


class FSQAutoencoder(nn.Module):
    """Image tokenizer: encode -> FSQ codes on a grid, decode -> images in [-1, 1]."""

    levels: tuple[int, ...]
    channels: tuple[int, ...]
    num_res_blocks: int = 1
    norm_groups: int = 8
    patch_size: int = 1

    def setup(self):
        _check_architecture(self.levels, self.channels, self.num_res_blocks, self.norm_groups,
                            self.patch_size)
        self.encoder = Encoder(self.channels, self.num_res_blocks, len(self.levels),
                               self.norm_groups, self.patch_size)
        self.decoder = Decoder(self.channels, self.num_res_blocks, self.norm_groups,
                               self.patch_size)

    @property
    def quantizer(self) -> FSQ:
        return FSQ(self.levels)

    @property
    def downsample(self) -> int:
        """Pixels per token side (`downsample_factor`)."""
        return downsample_factor(self.channels, self.patch_size)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode(self, images):
        """images (uint8, or float in [-1, 1]) [B, H, W, 3] -> codes [B, H/f, W/f, dim] on the FSQ grid."""
        images = _as_float_images(images, self.downsample)
        return self.quantizer.quantize(self.encoder(images))

    def encode_with_indices(self, images):
        """(codes [B, h, w, dim], int32 indices [B, h, w]); the interface VQAutoencoder shares."""
        codes = self.encode(images)
        return codes, self.quantizer.codes_to_indices(codes)

    def codes_from_indices(self, indices):
        """Grid codes [..., dim] of integer indices [...]."""
        return self.quantizer.indices_to_codes(indices)

    def decode(self, codes, clip: bool = True):
        """codes [B, h, w, dim] -> images [B, h*f, w*f, 3] in [-1, 1] (unclipped if clip=False)."""
        if codes.ndim != 4 or codes.shape[-1] != len(self.levels):
            raise ValueError(f"decode: codes must be [B, h, w, dim={len(self.levels)}], got {codes.shape}.")
        out = self.decoder(codes)
        return jnp.clip(out, -1.0, 1.0) if clip else out

    def __call__(self, images):
        """(unclipped reconstruction [B, H, W, 3], codes [B, h, w, dim])."""
        codes = self.encode(images)
        return self.decode(codes, clip=False), codes


def _check_architecture(levels, channels, num_res_blocks, norm_groups, patch_size=1) -> None:
    FSQ(levels)  # validates levels
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"fsq.patch_size={patch_size}: must be a positive integer.")
    if len(channels) < 1 or any(int(c) < 1 for c in channels):
        raise ValueError(f"fsq.channels={tuple(channels)}: need at least one positive width.")
    if num_res_blocks < 0:
        raise ValueError(f"fsq.num_res_blocks={num_res_blocks}: must be >= 0.")
    if norm_groups < 1 or any(c % norm_groups for c in channels):
        raise ValueError(f"fsq.norm_groups={norm_groups} must divide every width in "
                         f"fsq.channels={tuple(channels)}.")


def _as_float_images(images, factor: int):
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}.")
    if images.shape[1] % factor or images.shape[2] % factor:
        raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not divisible by the "
                         f"tokenizer's downsampling factor {factor} ({DOWNSAMPLE_RULE}).")
    if images.dtype == jnp.uint8:
        return images_to_float(jnp.asarray(images))
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}.")
    return images


# ---- construction and pure helpers -----------------------------------------------------------
def _fsq_block(cfg):
    """Accepts the `fsq` config block or a full config that holds one."""
    return cfg.fsq if "fsq" in cfg else cfg


def autoencoder_from_config(cfg):
    """Builds the tokenizer from `config.fsq` (or the full config): FSQAutoencoder, or
    `vq.VQAutoencoder` when `fsq.quantizer == "vq"`."""
    f = _fsq_block(cfg)
    if f.get("quantizer", "fsq") == "vq":
        from mmjax.tokenizers import vq
        return vq.vq_autoencoder_from_config(f)
    return FSQAutoencoder(levels=tuple(int(v) for v in f.levels),
                          channels=tuple(int(v) for v in f.channels),
                          num_res_blocks=int(f.num_res_blocks),
                          norm_groups=int(f.get("norm_groups", 8)),
                          patch_size=int(f.get("patch_size", 1)))


def init_params(model: FSQAutoencoder, rng, image_size: int, batch_size: int = 1):
    """Params boxed with their logical axis names (nn.unbox them for optax / apply)."""
    return init_variables(model, rng, image_size, batch_size)["params"]


def init_variables(model, rng, image_size: int, batch_size: int = 1) -> dict:
    """All variable collections: {"params"} for FSQ, plus {"vq"} for an EMA VQ codebook."""
    images = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    return dict(model.init(rng, images))


def variables_of(params) -> dict:
    """Flax variables from tokenizer weights: a params tree, or a {"params", "vq", ...} dict.

    The tokenizer's weights are passed around as one tree; for FSQ (and gradient-learned VQ)
    that is the params, for EMA VQ it is the variables dict (the EMA codebook is not a param).
    A params tree never has a top-level "params" key (its keys are module names).
    """
    return dict(params) if "params" in params else {"params": params}


def tokenize(model: FSQAutoencoder, params, images) -> jax.Array:
    """images [B, H, W, 3] -> int32 code indices [B, (H/f)*(W/f)], row-major over the token grid."""
    _, indices = model.apply(variables_of(params), images, method=type(model).encode_with_indices)
    return indices.reshape(indices.shape[0], -1).astype(jnp.int32)


def codebook_table(model, params) -> jax.Array:
    """Every code vector in index order, [codebook_size, d] (the VQ codebook the model stage
    reads; for FSQ, the grid)."""
    indices = jnp.arange(model.codebook_size, dtype=jnp.int32)
    return model.apply(variables_of(params), indices, method=type(model).codes_from_indices)


def detokenize(model: FSQAutoencoder, params, indices, grid_hw: tuple[int, int]) -> jax.Array:
    """int indices [B, h*w] (row-major) -> float images [B, h*f, w*f, 3] in [-1, 1]."""
    h, w = grid_hw
    if indices.ndim != 2 or indices.shape[1] != h * w:
        raise ValueError(f"detokenize: indices must be [B, {h}*{w}], got shape {indices.shape}.")
    variables = variables_of(params)
    codes = model.apply(variables, jnp.asarray(indices), method=type(model).codes_from_indices)
    return model.apply(variables, codes.reshape(indices.shape[0], h, w, -1),
                       method=type(model).decode)


def make_recon_fn(model: FSQAutoencoder, params):
    """A jitted `images uint8 -> (recon uint8, indices [B, h*w])`, as evals.recon expects."""
    variables = variables_of(params)

    @jax.jit
    def recon_fn(images):
        codes, indices = model.apply(variables, images, method=type(model).encode_with_indices)
        recon = model.apply(variables, codes, method=type(model).decode)
        return float_to_images(recon), indices.reshape(codes.shape[0], -1).astype(jnp.int32)
    return recon_fn


# ---- loss --------------------------------------------------------------------------------------
def psnr(a, b, max_val):
    """PSNR in dB of the mean squared error over all elements of a and b (jittable).

    `max_val` is the peak-to-peak signal range: 255 for uint8 pixels, 2.0 for images in [-1, 1].
    Identical inputs give +inf (MSE is 0): no cap, so a perfect reconstruction is never mistaken
    for a merely good one.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}.")
    return psnr_from_mse(jnp.mean(jnp.square(a - b)), max_val)


def psnr_from_mse(mse, max_val):
    """10 log10(max_val^2 / mse); +inf where mse == 0."""
    return 10.0 * jnp.log10(jnp.square(jnp.asarray(max_val, jnp.float32)) / mse)


def reconstruction_loss(recon, target, loss_type: str = "l2", l1_weight: float = 0.1):
    """Scalar: mean squared error, plus `l1_weight` * mean absolute error for "l1+l2"."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"fsq.loss={loss_type!r}: choose one of {LOSS_TYPES}.")
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    loss = jnp.mean(jnp.square(diff))
    if loss_type == "l1+l2":
        loss = loss + l1_weight * jnp.mean(jnp.abs(diff))
    return loss


def autoencoder_loss_fn(model: FSQAutoencoder, params, batch: dict[str, Any], rng, cfg):
    """(loss, {loss, mse, psnr}) for batch["image"] uint8 [B, H, W, 3]; pure and jittable.

    `cfg` is the `fsq` config block (or a full config holding one). `rng` is unused (the model
    is deterministic) and kept so every task's loss has the same signature. PSNR is measured on
    the clipped output in [-1, 1] (max_val 2), which equals PSNR in uint8 units up to rounding.
    """
    del rng
    f = _fsq_block(cfg)
    target = images_to_float(jnp.asarray(batch["image"]))
    recon, _ = model.apply({"params": params}, target)
    loss = reconstruction_loss(recon, target, f.loss, float(f.l1_weight))
    clipped = jnp.clip(recon, -1.0, 1.0)
    mse = jnp.mean(jnp.square(clipped - target))
    return loss, {"loss": loss, "mse": mse, "psnr": psnr(clipped, target, 2.0)}
