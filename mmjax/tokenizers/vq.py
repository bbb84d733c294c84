"""VQ-VAE quantizer (van den Oord et al. 2017) on the same conv autoencoder as FSQ: the baseline
the FSQ paper (Mentzer et al. 2023) compares against.

Why it is here: FSQ's central claim is that a fixed grid uses its codebook where a learned one
collapses. Measuring that needs a VQ that is as good as the paper's baselines, so it has the
usual tricks, each a config switch (`fsq.vq_*`):

- a learned codebook [K, d] with nearest-neighbour assignment and a straight-through gradient
  (`z + stop_gradient(e - z)`), plus the commitment loss `beta * |z - sg(e)|^2`;
- the codebook learned either by gradient (codebook loss `|sg(z) - e|^2`, `vq_ema_decay = 0`) or
  by exponential moving averages of the assigned encoder outputs (`vq_ema_decay > 0`, VQ-VAE
  appendix / Sonnet); the EMA statistics live in the Flax collection `"vq"`, not in the params;
- dead-code reseeding (Jukebox, Dhariwal et al. 2020; ViT-VQGAN): a code unused for
  `vq_reseed` consecutive training steps is replaced by a random encoder output of the batch;
- optional l2-normalised codes (ViT-VQGAN): z and the codebook are compared on the unit sphere;
- low-dimensional codes: `vq_dim` is the latent width (ViT-VQGAN's factorised codes use 8-32).

Everything below is a pure function of arrays; `VQAutoencoder` only holds variables. The EMA
update and reseeding are applied by the tokenizer's loss function, which returns the new `"vq"`
collection to the trainer (train.py's optional model state).

EMA update (decay d, for code k, over the batch's encoder outputs z_i assigned to index i_i):
    N_k <- d N_k + (1 - d) #{i: i_i = k}
    m_k <- d m_k + (1 - d) sum_{i: i_i = k} z_i
    e_k <- m_k / N_k   where N_k > 1e-6 (else e_k is kept)
initialised N_k = 1, m_k = e_k (each code starts as if it had seen itself once, so the first
steps neither blow up nor shrink codes towards 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

QUANTIZERS = ("fsq", "vq")
_EMA_MIN_COUNT = 1e-6  # Below this EMA count a code keeps its vector (avoids 0/0).
_MAX_DIST_ENTRIES = 1 << 24  # Rows x codes per distance block (64 MiB of float32).
_RESEED_NOISE = 1e-3  # Relative jitter on reseeded codes so duplicates of one z differ.


# ---- pure math --------------------------------------------------------------------------------
def l2_normalize(x, eps: float = 1e-6):
    """x / |x| over the last axis (0 stays 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps * eps))


def _nearest_block(z, codebook):
    d2 = (jnp.sum(jnp.square(codebook), -1)[None, :]
          - 2.0 * jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def nearest_indices(z, codebook):
    """int32 index of the nearest codebook row (squared L2) for every row of z [N, d].

    Computed in blocks of rows so a 2^16-entry codebook never materialises an [N, K] matrix
    larger than `_MAX_DIST_ENTRIES`. Ties go to the lowest index (argmin).
    """
    z = jax.lax.stop_gradient(z)
    codebook = jax.lax.stop_gradient(codebook)
    n, k = z.shape[0], codebook.shape[0]
    rows = max(1, _MAX_DIST_ENTRIES // max(k, 1))
    if n <= rows:
        return _nearest_block(z, codebook)
    blocks = -(-n // rows)
    padded = jnp.pad(z, ((0, blocks * rows - n), (0, 0)))
    out = jax.lax.map(lambda b: _nearest_block(b, codebook), padded.reshape(blocks, rows, -1))
    return out.reshape(-1)[:n]


def quantize(z, codebook):
    """(straight-through codes, indices, codebook vectors) for z [..., d] and codebook [K, d].

    The forward value of the first output is the nearest codebook vector; its gradient w.r.t. z
    is the identity (the decoder's gradient is copied to the encoder).
    """
    flat = z.reshape(-1, z.shape[-1])
    indices = nearest_indices(flat, codebook).reshape(z.shape[:-1])
    zq = jnp.take(codebook, indices, axis=0)
    return z + jax.lax.stop_gradient(zq - z), indices, zq


def vq_losses(z, zq) -> tuple[jax.Array, jax.Array]:
    """(codebook loss |sg(z) - e|^2, commitment loss |z - sg(e)|^2), each a mean over elements."""
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - zq))
    commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(zq)))
    return codebook_loss, commitment


def code_counts(indices, codebook_size: int):
    """float32 [K]: how often each code occurs in `indices` (any shape)."""
    flat = indices.reshape(-1)
    return jax.ops.segment_sum(jnp.ones(flat.shape, jnp.float32), flat,
                               num_segments=codebook_size)


def ema_update(state: dict, z, indices, decay: float) -> dict:
    """The EMA codebook update of the module docstring. state: {codebook, ema_count, ema_sum, unused}.

    z [N, d] (treated as constants), indices int [N]. `unused` (steps since a code was last
    assigned) is advanced here too, as reseeding reads it.
    """
    z = jax.lax.stop_gradient(z).astype(jnp.float32)
    k = state["codebook"].shape[0]
    counts = code_counts(indices, k)
    sums = jax.ops.segment_sum(z, indices.reshape(-1), num_segments=k)
    count = decay * state["ema_count"] + (1.0 - decay) * counts
    total = decay * state["ema_sum"] + (1.0 - decay) * sums
    alive = count > _EMA_MIN_COUNT
    codebook = jnp.where(alive[:, None], total / jnp.maximum(count, _EMA_MIN_COUNT)[:, None],
                         state["codebook"])
    unused = jnp.where(counts > 0, 0, state["unused"] + 1).astype(jnp.int32)
    return {"codebook": codebook, "ema_count": count, "ema_sum": total, "unused": unused}


def reseed(state: dict, z, rng, after_steps: int) -> dict:
    """Replaces every code unused for >= `after_steps` steps by a random row of z [N, d].

    The reseeded code restarts as a fresh EMA code (count 1, sum = its vector, unused 0), so
    the next EMA step moves it towards what it is assigned, as at initialisation.
    """
    z = jax.lax.stop_gradient(z).astype(jnp.float32)
    k, n = state["codebook"].shape[0], z.shape[0]
    pick_rng, noise_rng = jax.random.split(rng)
    picks = jax.random.randint(pick_rng, (k,), 0, n)
    scale = jnp.sqrt(jnp.mean(jnp.square(z))) * _RESEED_NOISE
    fresh = z[picks] + scale * jax.random.normal(noise_rng, (k, z.shape[1]), jnp.float32)
    dead = state["unused"] >= after_steps
    col = dead[:, None]
    return {"codebook": jnp.where(col, fresh, state["codebook"]),
            "ema_count": jnp.where(dead, 1.0, state["ema_count"]),
            "ema_sum": jnp.where(col, fresh, state["ema_sum"]),
            "unused": jnp.where(dead, 0, state["unused"]).astype(jnp.int32)}


def init_ema_state(codebook) -> dict:
    """EMA statistics for an initial codebook [K, d] (N = 1, m = e, unused = 0)."""
    k = codebook.shape[0]
    return {"codebook": codebook, "ema_count": jnp.ones((k,), jnp.float32),
            "ema_sum": codebook, "unused": jnp.zeros((k,), jnp.int32)}


# ---- the quantizer as configured ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VQSettings:
    """The `fsq.vq_*` fields, validated (see config_defaults.fsq_config)."""

    codebook_size: int
    dim: int
    beta: float = 0.25
    ema_decay: float = 0.99
    reseed: int = 0
    l2: bool = False

    def __post_init__(self):
        if self.codebook_size < 2 or self.codebook_size > 2**31 - 1:
            raise ValueError(f"fsq.vq_codebook_size={self.codebook_size}: must be in [2, 2^31).")
        if self.dim < 1:
            raise ValueError(f"fsq.vq_dim={self.dim}: must be >= 1.")
        if self.beta < 0:
            raise ValueError(f"fsq.vq_beta={self.beta}: must be >= 0.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"fsq.vq_ema_decay={self.ema_decay}: must be in [0, 1) (0 = codebook "
                             "learned by gradient).")
        if self.reseed < 0:
            raise ValueError(f"fsq.vq_reseed={self.reseed}: must be >= 0 (0 = off).")
        if self.reseed and not self.ema_decay:
            raise ValueError(f"fsq.vq_reseed={self.reseed} needs fsq.vq_ema_decay > 0 (reseeding "
                             "rewrites the EMA codebook).")

    @property
    def ema(self) -> bool:
        return self.ema_decay > 0


def settings_from_config(cfg) -> VQSettings:
    """VQSettings from the `fsq` block (or a full config holding one)."""
    f = cfg.fsq if "fsq" in cfg else cfg
    return VQSettings(codebook_size=int(f.vq_codebook_size), dim=int(f.vq_dim),
                      beta=float(f.vq_beta), ema_decay=float(f.vq_ema_decay),
                      reseed=int(f.vq_reseed), l2=bool(f.vq_l2))


class VQAutoencoder(nn.Module):
    """The FSQ autoencoder's encoder/decoder with a learned codebook in place of the FSQ grid.

    Variables: `params` (encoder, decoder, and `codebook` when learned by gradient) and, with
    EMA, the collection `vq` = {codebook, ema_count, ema_sum, unused}. Methods mirror
    FSQAutoencoder (`encode`, `decode`, `encode_with_indices`, `codes_from_indices`).
    """

    settings: VQSettings
    channels: tuple[int, ...]
    num_res_blocks: int = 1
    norm_groups: int = 8
    patch_size: int = 1

    def setup(self):
        from mmjax.tokenizers import autoencoder as ae
        ae._check_architecture((2,), self.channels, self.num_res_blocks, self.norm_groups,
                               self.patch_size)
        s = self.settings
        self.encoder = ae.Encoder(self.channels, self.num_res_blocks, s.dim, self.norm_groups,
                                  self.patch_size)
        self.decoder = ae.Decoder(self.channels, self.num_res_blocks, self.norm_groups,
                                  self.patch_size)
        shape = (s.codebook_size, s.dim)
        init = nn.initializers.normal(1.0)
        if s.ema:  # init_ema_state's layout, as a Flax collection
            self.ema_codebook = self.variable("vq", "codebook", lambda: self._init_codebook(shape))
            self.ema_count = self.variable("vq", "ema_count",
                                           lambda: jnp.ones((shape[0],), jnp.float32))
            self.ema_sum = self.variable("vq", "ema_sum", lambda: self.ema_codebook.value)
            self.unused = self.variable("vq", "unused", lambda: jnp.zeros((shape[0],), jnp.int32))
        else:
            self.learned_codebook = self.param(
                "codebook", nn.with_logical_partitioning(init, ("codebook", "code")), shape)

    def _init_codebook(self, shape):
        return jax.random.normal(self.make_rng("params"), shape, jnp.float32)

    # The code width is `settings.dim`; `downsample` as in FSQAutoencoder.
    @property
    def downsample(self) -> int:
        from mmjax.tokenizers import autoencoder as ae
        return ae.downsample_factor(self.channels, self.patch_size)

    @property
    def codebook_size(self) -> int:
        return self.settings.codebook_size

    def codebook(self):
        """The codebook [K, d] as used for assignment (unit rows when `l2`)."""
        cb = self.ema_codebook.value if self.settings.ema else self.learned_codebook
        return l2_normalize(cb) if self.settings.l2 else cb

    def latents(self, images):
        """Pre-quantisation encoder output [B, h, w, d] (unit vectors when `l2`)."""
        from mmjax.tokenizers import autoencoder as ae
        z = self.encoder(ae._as_float_images(images, self.downsample))
        return l2_normalize(z) if self.settings.l2 else z

    def forward(self, images):
        """Everything the loss needs: {recon (unclipped), z, zq, indices, codes (straight-through)}."""
        z = self.latents(images)
        codes, indices, zq = quantize(z, self.codebook())
        return {"recon": self.decoder(codes), "z": z, "zq": zq, "indices": indices,
                "codes": codes}

    def encode_with_indices(self, images):
        """(codes [B, h, w, d], int32 indices [B, h, w])."""
        codes, indices, _ = quantize(self.latents(images), self.codebook())
        return codes, indices

    def encode(self, images):
        return self.encode_with_indices(images)[0]

    def codes_from_indices(self, indices):
        """Codebook vectors [..., d] of integer indices [...]."""
        return jnp.take(self.codebook(), indices, axis=0)

    def decode(self, codes, clip: bool = True):
        if codes.ndim != 4 or codes.shape[-1] != self.settings.dim:
            raise ValueError(f"decode: codes must be [B, h, w, vq_dim={self.settings.dim}], got "
                             f"{codes.shape}.")
        out = self.decoder(codes)
        return jnp.clip(out, -1.0, 1.0) if clip else out

    def __call__(self, images):
        out = self.forward(images)
        return out["recon"], out["codes"]


def vq_autoencoder_from_config(cfg) -> VQAutoencoder:
    f = cfg.fsq if "fsq" in cfg else cfg
    return VQAutoencoder(settings=settings_from_config(f),
                         channels=tuple(int(v) for v in f.channels),
                         num_res_blocks=int(f.num_res_blocks),
                         norm_groups=int(f.get("norm_groups", 8)),
                         patch_size=int(f.get("patch_size", 1)))


def vq_loss_fn(model: VQAutoencoder, variables: dict, batch: dict[str, Any], rng, cfg,
               train: bool):
    """(loss, (metrics, new "vq" collection or None)) for batch["image"] uint8; pure, jittable.

    loss = reconstruction + beta * commitment (+ codebook loss when it is learned by gradient).
    With EMA and `train`, the returned collection is the EMA-updated (and reseeded) one.
    """
    from mmjax.evals.recon import psnr
    from mmjax.tokenizers import autoencoder as ae
    f = cfg.fsq if "fsq" in cfg else cfg
    s = model.settings
    target = ae.images_to_float(jnp.asarray(batch["image"]))
    out = model.apply(variables, target, method=VQAutoencoder.forward)
    recon_loss = ae.reconstruction_loss(out["recon"], target, f.loss, float(f.l1_weight))
    codebook_loss, commitment = vq_losses(out["z"], out["zq"])
    loss = recon_loss + s.beta * commitment + (0.0 if s.ema else codebook_loss)
    clipped = jnp.clip(out["recon"], -1.0, 1.0)
    counts = code_counts(out["indices"], s.codebook_size)
    p = counts / jnp.sum(counts)
    metrics = {"loss": loss, "recon_loss": recon_loss, "commitment": commitment,
               "codebook_loss": codebook_loss, "mse": jnp.mean(jnp.square(clipped - target)),
               "psnr": psnr(clipped, target, 2.0),
               "batch_usage": jnp.mean((counts > 0).astype(jnp.float32)),
               "batch_perplexity": jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))}
    new_state = None
    if s.ema:
        state = variables["vq"]
        if train:
            z = out["z"].reshape(-1, s.dim)
            new_state = ema_update(state, z, out["indices"].reshape(-1), s.ema_decay)
            if s.reseed:
                new_state = reseed(new_state, z, rng, s.reseed)
            if s.l2:  # keep the stored codebook on the sphere it is compared on
                new_state = {**new_state, "codebook": l2_normalize(new_state["codebook"])}
        else:
            new_state = state
        # share of codes no token of this batch (or, with grad_accum, microbatch) was assigned to
        metrics["unused_this_step"] = jnp.mean((new_state["unused"] > 0).astype(jnp.float32))
    return loss, (metrics, new_state)



# ---- the codebook the model stage reads --------------------------------------------------------
class LearnedCodebook:
    """A trained VQ codebook as the model stage uses it: FSQ's index <-> code-vector interface
    (`dim`, `codebook_size`, `levels`, `codebook`, `snap`, `codes_to_indices`, `indices_to_codes`)
    over a stored table [K, d] instead of a grid.

    Why the same interface: the packer, the model's input projection, both image heads and the
    sampler only need "which vector is index i" and "which index is nearest to this vector", so
    a VQ tokenizer feeds the model stage through exactly the code paths FSQ does. Its `levels`
    are `(K,)`: one mixed-radix digit of K values, so the discrete head's flat softmax over
    prod(levels) = K classes and its index arithmetic need no special case. As FSQ's methods,
    these run on numpy for host input and on jax (traceable) for device arrays.
    """

    def __init__(self, table):
        table = np.asarray(table, np.float32)
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 1:
            raise ValueError(f"LearnedCodebook: the table must be [K >= 2, d >= 1], got "
                             f"{table.shape}.")
        self.table = table
        self.table.flags.writeable = False

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def codebook_size(self) -> int:
        return int(self.table.shape[0])

    @property
    def levels(self) -> tuple[int, ...]:
        return (self.codebook_size,)

    def codebook(self) -> np.ndarray:
        """The table [K, d] (float32, index order)."""
        return self.table

    def codes_to_indices(self, codes):
        """int32 index [...] of the nearest table row (squared L2) to each vector [..., d]."""
        self._check_last_axis(codes, "codes")
        flat = jnp.asarray(codes, jnp.float32).reshape(-1, self.dim)
        indices = nearest_indices(flat, jnp.asarray(self.table)).reshape(np.shape(codes)[:-1])
        return indices if isinstance(codes, jax.Array) else np.asarray(indices)

    def indices_to_codes(self, indices):
        """float32 table rows [..., d] of integer indices [...]."""
        if isinstance(indices, jax.Array):
            return jnp.take(jnp.asarray(self.table), indices, axis=0)
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"LearnedCodebook.indices_to_codes: indices must be integers, got "
                             f"dtype {indices.dtype}.")
        return self.table[indices]

    def snap(self, x):
        """The nearest table row to each vector x [..., d] (the flow sampler's last step)."""
        return self.indices_to_codes(self.codes_to_indices(x))

    def _check_last_axis(self, x, name: str) -> None:
        shape = np.shape(x)
        if not shape or shape[-1] != self.dim:
            raise ValueError(f"LearnedCodebook: {name} has shape {tuple(shape)}; its last axis "
                             f"must be the code width {self.dim}.")
