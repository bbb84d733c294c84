"""MultimodalLM: embeddings -> Mixture-of-Transformers blocks -> per-modality final norm -> heads.

Consumes the packed batch of docs/INTERFACES.md. Text positions (modality 0) embed their
SentencePiece id; every other modality embeds its continuous FSQ code vector with a linear
projection (the same for the flow and the discrete head, so one backbone serves both). The
backbone is routed by modality (mot.py); `__call__` returns hidden states [B, L, D] and the head
methods map them to LM logits, flow velocities or FSQ-index logits.

Decoding uses an explicit KV-cache pytree (`init_cache`) rather than a flax collection, so the
sampler can jit, donate and carry it like any other array:

    cache = init_cache(cfg, batch_size)                             # no params needed
    hidden, cache = model.apply({"params": p}, prompt, cache, method=MultimodalLM.decode)
    hidden, cache = model.apply({"params": p}, step, cache, method=MultimodalLM.decode)

A chunk is a dict with the batch keys `tokens`, `codes`, `modality`, `positions`,
`segment_ids`, `image_block`, `image_pos` (each [B, T], codes [B, T, d]; `image_pos` is read only
when model.image_positions != "none"). The cache then holds T more slots.
A context image block must be decoded within one chunk (see masks.decode_attention_mask).

Bad input that can only be seen at run time (a modality id >= num_modalities, a chunk that
overflows the cache) turns the affected hidden states into NaN instead of silently computing
something else; with concrete (non-traced) inputs it raises ValueError instead.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmjax.models import attention, heads, layers, mot
from mmjax.models.config import ModelConfig

CHUNK_KEYS = ("tokens", "codes", "modality", "positions", "segment_ids", "image_block", "image_pos")


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None) -> dict[str, Any]:
    """An empty KV cache for `batch_size` rows and `max_len` slots (default model.max_seq_len).

    {"index": int32 [] next free slot, "segment_ids"/"image_block": int32 [B, S] of the cached
    positions (0 = empty), "layers": ({"k", "v": [B, H, S, Dh] in the compute dtype}, ...)}.
    Head-major, so a decode step's attention reads the cache without transposing it
    (models/kv_cache.py).
    """
    size = int(max_len or cfg.max_seq_len)
    heads_, d = cfg.num_heads, cfg.d_model
    dtype = layers.resolve_dtype(cfg.dtype)
    kv = lambda: jnp.zeros((batch_size, heads_, size, d // heads_), dtype)  # noqa: E731
    return {
        "index": jnp.zeros((), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, size), jnp.int32),
        "image_block": jnp.zeros((batch_size, size), jnp.int32),
        "layers": tuple({"k": kv(), "v": kv()} for _ in range(cfg.num_layers)),
    }


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class MultimodalLM(nn.Module):
    """Decoder-only MoT over text tokens and image code vectors (FSQ grid or VQ codebook rows).

    cfg: the checked ModelConfig (config_validation.model_config): the `model` block plus the
    text vocabulary and the image tokens' index levels and code dim d. Its values are not checked
    again here; the image head module comes from the config's registry entry `cfg.head`.
    """

    cfg: ModelConfig

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def fsq_levels(self) -> tuple[int, ...]:
        return self.cfg.fsq_levels

    def setup(self):
        c = self.cfg
        self.num_modalities = c.num_modalities
        self.dtype = layers.resolve_dtype(c.dtype)
        d = c.d_model
        self.code_dim = c.code_dim
        self.embed = nn.Embed(c.vocab_size, d, dtype=self.dtype, param_dtype=jnp.float32,
                              embedding_init=layers.partitioned(
                                  nn.initializers.normal(d ** -0.5), ("vocab", "embed")))
        self.code_in = nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                kernel_init=layers.partitioned(layers.fan_in_init(-2, -1),
                                                               ("code", "embed")))
        if c.image_input == "code+index":
            self.image_embed = nn.Embed(c.codebook_size, d, dtype=self.dtype,
                                        param_dtype=jnp.float32,
                                        embedding_init=layers.partitioned(
                                            nn.initializers.normal(d ** -0.5), ("vocab", "embed")))
        if c.image_positions != "none" and c.image_side <= 0:
            raise ValueError(f"model.image_positions={c.image_positions!r} needs "
                             "ModelConfig.image_side")
        if c.image_positions == "learned_2d":
            # Small init (GPT-2 style): at first an image input is its code, plus a little where.
            table = lambda: nn.Embed(  # noqa: E731
                c.image_side, d, dtype=self.dtype, param_dtype=jnp.float32,
                embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                  ("image_grid", "embed")))
            self.image_row, self.image_col = table(), table()
        block = layers.remat_module(mot.MoTBlock, c.remat)
        self.blocks = [block(self.num_modalities, d, c.num_heads, c.mlp_dim, c.rope_theta,
                             c.norm_eps, self.dtype, c.mot_impl, c.mot_tile, c.attention_impl,
                             c.attention_block)
                       for _ in range(c.num_layers)]
        self.final_norm = mot.ModalityRMSNorm(self.num_modalities, c.norm_eps, self.dtype)
        if not c.tie_embeddings:
            self.lm_head = heads.LMHead(c.vocab_size, self.dtype)
        # The registry names the attribute, hence the parameter collection ("flow_head" /
        # "index_head"), so checkpoints keep their layout.
        setattr(self, c.head.attr, c.head.module(c, self.dtype))

    # ---- inputs ------------------------------------------------------------------------------
    def embed_inputs(self, batch: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
        """Per-position input vectors [B, T, D]: text embedding or projected code vector (plus,
        with model.image_input="code+index", the embedding of the image token's index, and with
        a 2-D model.image_positions, the row and column features of image tokens).

        CAM noise augmentation (train only, model.noise_aug > 0): see `_cam_noise`.
        """
        tokens, codes, modality = batch["tokens"], batch["codes"], batch["modality"]
        if codes.shape[-1] != self.code_dim:
            raise ValueError(f"batch['codes'] has last axis {codes.shape[-1]}, expected the "
                             f"image tokens' code dim {self.code_dim}.")
        is_text = modality == 0
        text = self.embed(jnp.where(is_text, tokens, 0))
        codes = codes.astype(jnp.float32)
        if train and self.cfg.noise_aug > 0:
            codes = codes + self._cam_noise(batch, codes.shape)
        image = self.code_in(codes)
        if self.cfg.image_input == "code+index":  # image positions of `tokens` hold the index
            index = jnp.clip(jnp.where(is_text, 0, tokens), 0, self.cfg.codebook_size - 1)
            image = image + self.image_embed(index)
        if self.cfg.grid_embedding:
            image = image + self._grid_embedding(batch, ~is_text)
        return jnp.where(is_text[..., None], text, image).astype(self.dtype)

    def _cam_noise(self, batch, shape) -> jax.Array:
        """CAM (Continuous AR Models, Fan et al.) noise [B, T, d] for the code inputs.

        Only inputs of GENERATED image tokens get noise (image tokens of text->image documents:
        the model feeds those back to itself when sampling); context images (image_block > 0)
        are clean at inference, so they stay clean here. Each document (segment) draws its own
        std ~ U(0, model.noise_aug), as a sequence does in the paper, not one per packed row.
        """
        segment = batch["segment_ids"].astype(jnp.int32)
        generated = (batch["modality"] != 0) & (batch["image_block"] == 0) & (segment > 0)
        key_std, key_noise = jax.random.split(self.make_rng("noise"))
        # Segment ids are < T + 1, so one draw per possible id and row covers every document.
        per_segment = jax.random.uniform(key_std, (shape[0], shape[1] + 1),
                                         maxval=self.cfg.noise_aug)
        std = jnp.take_along_axis(per_segment, segment, axis=1)
        noise = std[..., None] * jax.random.normal(key_noise, shape)
        return jnp.where(generated[..., None], noise, 0.0)

    def _image_index(self, batch, is_image) -> tuple[jax.Array, jax.Array]:
        """(index of each image token inside its image, clipped to the grid, [B, T]; where that
        index is valid) from `image_pos` (-1 at text and padding)."""
        if "image_pos" not in batch:
            raise ValueError(f"model.image_positions={self.cfg.image_positions!r} needs "
                             "batch['image_pos'] (the index of each image token inside its "
                             "image, -1 elsewhere).")
        side = self.cfg.image_side
        pos = batch["image_pos"].astype(jnp.int32)
        if _is_concrete(pos) and int(np.max(np.asarray(pos), initial=-1)) >= side * side:
            raise ValueError(f"batch['image_pos'] holds indices >= {side * side} = image_side**2 "
                             f"(image_side={side}).")
        return jnp.clip(pos, 0, side * side - 1), is_image & (pos >= 0)

    def _grid_embedding(self, batch, is_image) -> jax.Array:
        """Row + column embedding [B, T, D] of each image token (0 elsewhere) from its index
        inside its image (`image_pos`): row = idx // side, col = idx % side. Learned tables
        ("learned_2d") or fixed sin-cos features ("sincos_2d", `layers.sincos_2d`)."""
        side = self.cfg.image_side
        pos, valid = self._image_index(batch, is_image)
        if self.cfg.image_positions == "sincos_2d":
            emb = layers.sincos_2d(pos // side, pos % side, self.cfg.d_model)
        else:
            emb = self.image_row(pos // side) + self.image_col(pos % side)
        return jnp.where(valid[..., None], emb, 0.0)

    def _rope_positions(self, batch) -> jax.Array:
        """RoPE positions: the in-document positions [B, T], or with model.image_positions=
        "rope_2d" three axes [B, T, 3] (layers.rope): (position, start + row, start + col) for an
        image token whose image starts at in-document position `start`, (p, p, p) for text.

        Why: with 1-D RoPE the token above is `side` positions back, as is the end of the row
        before; the row and column axes make "same column, one row up" a fixed rotation, as
        LlamaGen's 2-D RoPE and Qwen2-VL's M-RoPE do. The first axis keeps the 1-D position, so
        nothing the 1-D scheme tells is lost, and text is rotated exactly as before. Offsets
        inside a document are all that matter, so packed documents stay independent and cached
        decoding (which sees the same positions and image_pos) matches the full forward."""
        positions = batch["positions"].astype(jnp.int32)
        if self.cfg.image_positions != "rope_2d":
            return positions
        side = self.cfg.image_side
        idx, valid = self._image_index(batch, batch["modality"] != 0)
        start = positions - idx
        row = jnp.where(valid, start + idx // side, positions)
        col = jnp.where(valid, start + idx % side, positions)
        return jnp.stack([positions, row, col], axis=-1)

    def _valid_modality(self, ids):
        """Ids that have weights (with one modality every id >= 0 shares them)."""
        ok = ids >= 0
        return ok & (ids < self.num_modalities) if self.num_modalities > 1 else ok

    def _backbone(self, batch, mask, kv_layers=None, *, train):
        """Embeds, sorts once, runs the blocks on the sorted stream, un-sorts once."""
        tokens, modality = batch["tokens"], batch["modality"]
        if _is_concrete(modality) and not self._valid_modality(np.asarray(modality)).all():
            raise ValueError(f"batch['modality'] holds ids outside [0, {self.num_modalities}) "
                             f"(model.num_modalities={self.num_modalities}).")
        b, t = tokens.shape
        tile = self.cfg.mot_tile
        impl = self.mot_impl_for(b, t, cached=kv_layers is not None)
        if impl == "buckets":
            blocks = mot.bucket_blocks(b, self.cfg.bucket_rows, mot.routing_shards(b, impl))
            routing = mot.make_bucket_routing(modality, batch["segment_ids"] > 0,
                                              self.cfg.image_capacity, blocks)
            if _is_concrete(routing.overflow) and bool(np.asarray(routing.overflow).any()):
                raise ValueError(f"rows hold more image tokens than image_capacity="
                                 f"{self.cfg.image_capacity} per row allows over each "
                                 f"{self.cfg.bucket_rows} row(s) (or more text than the rest of "
                                 f"their {t} positions); rows must come from the config's packer")
        else:
            routing = mot.make_routing(modality, self.num_modalities, mot.routing_shards(b, impl),
                                       tile if impl == "tiled" else None)
        x = self.embed_inputs(batch, train=train)
        d = x.shape[-1]
        x = mot.sorted_layout(mot.to_sorted(x, routing), routing, b, t)
        positions = self._rope_positions(batch)
        new_kv = []
        for i, block in enumerate(self.blocks):
            kv = None if kv_layers is None else (kv_layers[i]["k"], kv_layers[i]["v"])
            x, kv = block(x, routing, positions, mask, kv)
            new_kv.append(kv)
        h = self.final_norm(x.reshape(-1, d), routing)
        h = mot.from_sorted(h, routing, (b, t, d))
        ok = self._valid_modality(jnp.asarray(modality))
        if routing.overflow is not None:
            ok = ok & ~routing.overflow[:, None]
        h = jnp.where(ok[..., None], h, jnp.nan)
        return layers.constrain(h, ("batch", "length", "embed")), new_kv

    def mot_impl_for(self, batch: int, length: int, cached: bool = False) -> str:
        """The grouped-compute path (mot.resolve_impl) a call of [batch, length] runs: the static
        buckets only for packed rows they are sized for (two modalities, a known image capacity,
        full-length rows in whole bucket groups, no KV cache: decode chunks are not packed rows)."""
        c = self.cfg
        fit = (c.num_modalities == 2 and c.image_capacity > 0 and not cached
               and length == c.max_seq_len and batch % c.bucket_rows == 0)
        return mot.resolve_impl(c.mot_impl, batch * length, c.mot_tile, fit)

    # ---- forward -----------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        """Hidden states [B, L, D] of a packed batch (only its input keys are read)."""
        mask = attention.train_spec(batch["segment_ids"], batch["image_block"],
                                    self.cfg.image_bidirectional_context)
        hidden, _ = self._backbone(batch, mask, train=train)
        return hidden

    def decode(self, chunk: Mapping[str, jax.Array], cache: dict[str, Any]):
        """Runs T new positions against the cache -> (hidden [B, T, D], updated cache)."""
        needed = CHUNK_KEYS if self.cfg.image_positions != "none" else CHUNK_KEYS[:-1]
        missing = [k for k in needed if k not in chunk]
        if missing:
            raise ValueError(f"decode chunk is missing {missing} (needs {needed}).")
        index = cache["index"]
        t, size = chunk["tokens"].shape[1], cache["segment_ids"].shape[1]
        if _is_concrete(index) and int(index) + t > size:
            raise ValueError(f"decode: chunk of {t} positions at slot {int(index)} overflows the "
                             f"cache of {size} slots (init_cache max_len / model.max_seq_len).")
        start = (jnp.zeros((), jnp.int32), index)
        seg = jax.lax.dynamic_update_slice(cache["segment_ids"],
                                           chunk["segment_ids"].astype(jnp.int32), start)
        blk = jax.lax.dynamic_update_slice(cache["image_block"],
                                           chunk["image_block"].astype(jnp.int32), start)
        mask = attention.decode_spec(
            chunk["segment_ids"], chunk["image_block"], index, seg, blk,
            self.cfg.image_bidirectional_context)
        hidden, kv = self._backbone(chunk, mask, cache["layers"], train=False)
        hidden = jnp.where(index + t > size, jnp.nan, hidden)
        new_cache = {"index": index + t, "segment_ids": seg, "image_block": blk,
                     "layers": tuple({"k": k, "v": v} for k, v in kv)}
        return hidden, new_cache

    def init_cache(self, batch_size: int, max_len: int | None = None) -> dict[str, Any]:
        """Same as the module-level `init_cache` (convenience under `apply`)."""
        return init_cache(self.cfg, batch_size, max_len)

    # ---- heads -------------------------------------------------------------------------------
    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Text logits, float32 [..., vocab_size]."""
        if self.cfg.tie_embeddings:
            table = self.embed.embedding.astype(self.dtype)
            return jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), table,
                              preferred_element_type=jnp.float32)
        return self.lm_head(hidden)

    def _image_head(self, name: str | None = None):
        """The image head module (the registry entry's), or a ValueError when the caller asked
        for head `name` and the config has another (a run-time call, not a config check)."""
        if name is not None and self.cfg.image_head != name:
            raise ValueError(f"needs model.image_head={name!r} (got {self.cfg.image_head!r}).")
        return getattr(self, self.cfg.head.attr)

    def apply_image_head(self, hidden: jax.Array, *args):
        """The configured image head on hidden states (its inputs: see its registry entry)."""
        return self._image_head()(hidden, *args)

    def flow_velocity(self, hidden: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Velocity [..., d] at noisy codes x_t [..., d] and times t [...]; hidden [..., D]
        broadcasts against x_t's leading dims (e.g. [B, L, D] with x_t [K, B, L, d])."""
        try:
            head = self._image_head("flow")
        except ValueError as e:
            raise ValueError(f"flow_velocity {e}") from None
        return head(hidden, x_t, t)

    def index_logits(self, hidden: jax.Array) -> tuple[jax.Array, ...]:
        """FSQ-index logits: a 1-tuple [..., prod(levels)], or one [..., L_i] per FSQ channel
        when model.discrete_factorized (see heads.index_nll / index_argmax)."""
        try:
            head = self._image_head("discrete")
        except ValueError as e:
            raise ValueError(f"index_logits {e}") from None
        return head(hidden)

    def init_all(self, batch: Mapping[str, jax.Array]):
        """Touches every parameter (backbone and the configured heads); use as `init` method."""
        hidden = self(batch)
        return [self.lm_logits(hidden), self.cfg.head.init_outputs(self, hidden, batch)]


def init_params(model: MultimodalLM, rng: jax.Array, batch: Mapping[str, jax.Array]):
    """Boxed (logically partitioned) params of every module the config uses."""
    return model.init(rng, batch, method=MultimodalLM.init_all)["params"]
