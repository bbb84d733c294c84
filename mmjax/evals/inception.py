"""The FID InceptionV3 feature network in Flax (pool3 features, 2048-d), as pytorch-fid builds it.

Why this exact variant: FID numbers are comparable only when computed with the network of the
original TF implementation (`pt_inception-2015-12-05`), which pytorch-fid ports with four changed
blocks (FIDInceptionA/C/E_1: average pools that do not count padding; E_2: a max pool). Parameter
names follow pytorch-fid's state dict (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_mean`),
so its weights file converts with one line (see mmjax/evals/fid.py: load_inception_params).

Input: images in [0, 1], any size, [B, H, W, 3]; resized bilinearly to 299x299 and scaled to
[-1, 1] as pytorch-fid does (`resize_input=True, normalize_input=True`). No I/O here.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

BN_EPS = 1e-3  # pytorch-fid's BasicConv2d BatchNorm eps
FEATURE_DIM = 2048


class BasicConv(nn.Module):
    """Conv (no bias) + inference BatchNorm + ReLU, with pytorch-fid's parameter names."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        w = ConvWeight(self.features, cin, self.kernel, name="conv")()
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride),
            [(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])],
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return nn.relu(InferenceBN(self.features, name="bn")(y))


class ConvWeight(nn.Module):
    """Holds `weight` in HWIO (pytorch's OIHW is transposed when loading)."""

    features: int
    cin: int
    kernel: tuple[int, int]

    @nn.compact
    def __call__(self):
        shape = (*self.kernel, self.cin, self.features)
        return self.param("weight", nn.initializers.lecun_normal(), shape)


class InferenceBN(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        f = self.features
        scale = self.param("weight", nn.initializers.ones, (f,))
        bias = self.param("bias", nn.initializers.zeros, (f,))
        mean = self.param("running_mean", nn.initializers.zeros, (f,))
        var = self.param("running_var", nn.initializers.ones, (f,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def max_pool(x, k=3, s=2, pad=0):
    return nn.max_pool(x, (k, k), (s, s), padding=[(pad, pad), (pad, pad)])


def avg_pool_no_pad_count(x, k=3, pad=1):
    """3x3 stride-1 average that divides by the number of real (non-padding) pixels."""
    padding = [(pad, pad), (pad, pad)]
    total = nn.avg_pool(x, (k, k), (1, 1), padding=padding) * (k * k)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = nn.avg_pool(ones, (k, k), (1, 1), padding=padding) * (k * k)
    return total / count


def _c(features, kernel, stride=1, padding=(0, 0), name=None):
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    p = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv(features, k, stride, p, name=name)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _c(64, 1, name="branch1x1")(x)
        b5 = _c(64, 5, padding=2, name="branch5x5_2")(_c(48, 1, name="branch5x5_1")(x))
        b3 = _c(64, 1, name="branch3x3dbl_1")(x)
        b3 = _c(96, 3, padding=1, name="branch3x3dbl_3")(_c(96, 3, padding=1, name="branch3x3dbl_2")(b3))
        bp = _c(self.pool_features, 1, name="branch_pool")(avg_pool_no_pad_count(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _c(384, 3, stride=2, name="branch3x3")(x)
        bd = _c(64, 1, name="branch3x3dbl_1")(x)
        bd = _c(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = _c(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x)], -1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _c(192, 1, name="branch1x1")(x)
        b7 = _c(c7, 1, name="branch7x7_1")(x)
        b7 = _c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _c(c7, 1, name="branch7x7dbl_1")(x)
        bd = _c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _c(192, 1, name="branch_pool")(avg_pool_no_pad_count(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _c(320, 3, stride=2, name="branch3x3_2")(_c(192, 1, name="branch3x3_1")(x))
        b7 = _c(192, 1, name="branch7x7x3_1")(x)
        b7 = _c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _c(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nn.Module):
    pool: str  # "avg" (FIDInceptionE_1, Mixed_7b) | "max" (FIDInceptionE_2, Mixed_7c)

    @nn.compact
    def __call__(self, x):
        b1 = _c(320, 1, name="branch1x1")(x)
        b3 = _c(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([_c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              _c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = _c(448, 1, name="branch3x3dbl_1")(x)
        bd = _c(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([_c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              _c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = avg_pool_no_pad_count(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        bp = _c(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
    """[B, H, W, 3] in [0, 1] -> [B, 2048] pool3 features."""

    resize: int = 299

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (self.resize, self.resize):
            x = jax.image.resize(x, (x.shape[0], self.resize, self.resize, x.shape[3]), "bilinear",
                                 antialias=False)  # = torch interpolate(bilinear, align_corners=False)
        x = 2.0 * x - 1.0
        x = _c(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = _c(32, 3, name="Conv2d_2a_3x3")(x)
        x = _c(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool(x)
        x = _c(80, 1, name="Conv2d_3b_1x1")(x)
        x = _c(192, 3, name="Conv2d_4a_3x3")(x)
        x = max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def flat_param_shapes(resize: int = 299) -> dict[str, tuple[int, ...]]:
    """pytorch-fid state-dict name -> shape in *pytorch* layout (conv weights OIHW)."""
    shapes = jax.eval_shape(lambda: FIDInceptionV3(resize).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3))))["params"]
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = ".".join(p.key for p in path)
        shape = tuple(leaf.shape)
        out[name] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    return out


def unflatten_torch(flat: dict, names: Sequence[str]) -> dict:
    """Nested Flax params from pytorch-named arrays (conv weights OIHW -> HWIO)."""
    params: dict = {}
    for name in names:
        value = jnp.asarray(flat[name], jnp.float32)
        if value.ndim == 4:
            value = jnp.transpose(value, (2, 3, 1, 0))
        node = params
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params
