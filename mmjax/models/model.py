"""MultimodalLM: embeddings -> Mixture-of-Transformers blocks -> per-modality final norm -> heads.

Consumes the packed batch of docs/INTERFACES.md. Text positions (modality 0) embed their
SentencePiece id; every other modality embeds its continuous FSQ code vector with a linear
projection (the same for the flow and the discrete head, so one backbone serves both). The
backbone is routed by modality (mot.py); `__call__` returns hidden states [B, L, D] and the head
methods map them to LM logits, flow velocities or FSQ-index logits.

Decoding uses an explicit KV-cache pytree (`init_cache`) rather than a flax collection, so the
sampler can jit, donate and carry it like any other array:

    cache = init_cache(model_cfg, batch_size)                       # no params needed
    hidden, cache = model.apply({"params": p}, prompt, cache, method=MultimodalLM.decode)
    hidden, cache = model.apply({"params": p}, step, cache, method=MultimodalLM.decode)

A chunk is a dict with the batch keys `tokens`, `codes`, `modality`, `positions`,
`segment_ids`, `image_block` (each [B, T], codes [B, T, d]). The cache then holds T more slots.
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

CHUNK_KEYS = ("tokens", "codes", "modality", "positions", "segment_ids", "image_block")
_HEADS = ("flow", "discrete")


def _cfg(model_cfg, name):
    try:
        return model_cfg[name]
    except (KeyError, AttributeError):
        raise ValueError(f"model config has no field {name!r} (see config_defaults.model_config)"
                         ) from None


def _cfg_or(model_cfg, name, default):
    """A field added after configs were saved (older configs lack it)."""
    try:
        return model_cfg[name]
    except (KeyError, AttributeError):
        return default


def init_cache(model_cfg, batch_size: int, max_len: int | None = None) -> dict[str, Any]:
    """An empty KV cache for `batch_size` rows and `max_len` slots (default model.max_seq_len).

    {"index": int32 [] next free slot, "segment_ids"/"image_block": int32 [B, S] of the cached
    positions (0 = empty), "layers": ({"k", "v": [B, S, H, Dh] in the compute dtype}, ...)}.
    """
    size = int(max_len or _cfg(model_cfg, "max_seq_len"))
    heads_, d = int(_cfg(model_cfg, "num_heads")), int(_cfg(model_cfg, "d_model"))
    dtype = layers.resolve_dtype(_cfg(model_cfg, "dtype"))
    kv = lambda: jnp.zeros((batch_size, size, heads_, d // heads_), dtype)  # noqa: E731
    return {
        "index": jnp.zeros((), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, size), jnp.int32),
        "image_block": jnp.zeros((batch_size, size), jnp.int32),
        "layers": tuple({"k": kv(), "v": kv()} for _ in range(int(_cfg(model_cfg, "num_layers")))),
    }


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class MultimodalLM(nn.Module):
    """Decoder-only MoT over text tokens and FSQ image code vectors.

    model_cfg: the `model` config block; vocab_size: text vocabulary; fsq_levels: FSQ levels
    (code dim d = len(levels); discrete head size prod(levels)).
    """

    model_cfg: Any
    vocab_size: int
    fsq_levels: tuple[int, ...]

    def setup(self):
        c = self.model_cfg
        self.num_modalities = int(_cfg(c, "num_modalities"))
        self.dtype = layers.resolve_dtype(_cfg(c, "dtype"))
        d, heads_ = int(_cfg(c, "d_model")), int(_cfg(c, "num_heads"))
        if d % heads_ or (d // heads_) % 2:
            raise ValueError(f"model.num_heads={heads_} must split model.d_model={d} into an even "
                             "head dimension (RoPE rotates pairs).")
        if _cfg(c, "image_head") not in _HEADS:
            raise ValueError(f"model.image_head={_cfg(c, 'image_head')!r}: must be one of "
                             f"{_HEADS}.")
        if _cfg(c, "mot_impl") not in mot.IMPLS:
            raise ValueError(f"model.mot_impl={_cfg(c, 'mot_impl')!r}: must be one of {mot.IMPLS}.")
        self.attention_impl = _cfg_or(c, "attention_impl", "auto")
        if self.attention_impl not in attention.IMPLS:
            raise ValueError(f"model.attention_impl={self.attention_impl!r}: must be one of "
                             f"{attention.IMPLS}.")
        self.code_dim = len(self.fsq_levels)
        self.embed = nn.Embed(self.vocab_size, d, dtype=self.dtype, param_dtype=jnp.float32,
                              embedding_init=layers.partitioned(
                                  nn.initializers.normal(d ** -0.5), ("vocab", "embed")))
        self.code_in = nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                kernel_init=layers.partitioned(layers.fan_in_init(-2, -1),
                                                               ("code", "embed")))
        block = layers.remat_module(mot.MoTBlock, _cfg(c, "remat"))
        self.blocks = [block(self.num_modalities, d, heads_, int(_cfg(c, "mlp_dim")),
                             float(_cfg(c, "rope_theta")), float(_cfg(c, "norm_eps")), self.dtype,
                             _cfg(c, "mot_impl"), int(_cfg(c, "mot_tile")),
                             self.attention_impl, int(_cfg_or(c, "attention_block", 512)))
                       for _ in range(int(_cfg(c, "num_layers")))]
        self.final_norm = mot.ModalityRMSNorm(self.num_modalities, float(_cfg(c, "norm_eps")),
                                              self.dtype)
        if not _cfg(c, "tie_embeddings"):
            self.lm_head = heads.LMHead(self.vocab_size, self.dtype)
        if _cfg(c, "image_head") == "flow":
            self.flow_head = heads.FlowHead(self.code_dim, int(_cfg(c, "flow_width")),
                                            int(_cfg(c, "flow_depth")), self.dtype)
        else:
            self.index_head = heads.IndexHead(tuple(self.fsq_levels),
                                              bool(_cfg(c, "discrete_factorized")), self.dtype)

    # ---- inputs ------------------------------------------------------------------------------
    def embed_inputs(self, tokens, codes, modality, *, train: bool) -> jax.Array:
        """Per-position input vectors [B, T, D]: text embedding or projected code vector.

        CAM noise augmentation (train only, model.noise_aug > 0): each sequence draws a noise
        std ~ U(0, noise_aug) and its continuous inputs get that much Gaussian noise, so the model
        learns to cope with the imperfect codes it will feed itself when sampling.
        """
        if codes.shape[-1] != self.code_dim:
            raise ValueError(f"batch['codes'] has last axis {codes.shape[-1]}, expected the FSQ "
                             f"dim {self.code_dim} (len(fsq.levels)={self.fsq_levels}).")
        is_text = modality == 0
        text = self.embed(jnp.where(is_text, tokens, 0))
        codes = codes.astype(jnp.float32)
        noise_aug = float(_cfg(self.model_cfg, "noise_aug"))
        if train and noise_aug > 0:
            key_std, key_noise = jax.random.split(self.make_rng("noise"))
            std = jax.random.uniform(key_std, codes.shape[:1] + (1,) * (codes.ndim - 1),
                                     maxval=noise_aug)
            noise = std * jax.random.normal(key_noise, codes.shape)
            codes = codes + jnp.where(is_text[..., None], 0.0, noise)
        image = self.code_in(codes)
        return jnp.where(is_text[..., None], text, image).astype(self.dtype)

    def _valid_modality(self, ids):
        """Ids that have weights (with one modality every id >= 0 shares them)."""
        ok = ids >= 0
        return ok & (ids < self.num_modalities) if self.num_modalities > 1 else ok

    def _backbone(self, batch, mask, kv_layers=None, cache_index=None, *, train):
        """Embeds, sorts once, runs the blocks on the sorted stream, un-sorts once."""
        tokens, modality = batch["tokens"], batch["modality"]
        if _is_concrete(modality) and not self._valid_modality(np.asarray(modality)).all():
            raise ValueError(f"batch['modality'] holds ids outside [0, {self.num_modalities}) "
                             f"(model.num_modalities={self.num_modalities}).")
        b, t = tokens.shape
        tile = int(_cfg(self.model_cfg, "mot_tile"))
        impl = mot.resolve_impl(_cfg(self.model_cfg, "mot_impl"), b * t, tile)
        routing = mot.make_routing(modality, self.num_modalities, mot.routing_shards(b, impl),
                                   tile if impl == "tiled" else None)
        x = self.embed_inputs(tokens, batch["codes"], modality, train=train)
        d = x.shape[-1]
        x = mot.sorted_layout(mot.to_sorted(x, routing), routing, b, t)
        new_kv = []
        for i, block in enumerate(self.blocks):
            kv = None if kv_layers is None else (kv_layers[i]["k"], kv_layers[i]["v"])
            x, kv = block(x, routing, batch["positions"], mask, kv, cache_index)
            new_kv.append(kv)
        h = self.final_norm(x.reshape(-1, d), routing)
        h = mot.from_sorted(h, routing, (b, t, d))
        h = jnp.where(self._valid_modality(jnp.asarray(modality))[..., None], h, jnp.nan)
        return layers.constrain(h, ("batch", "length", "embed")), new_kv

    # ---- forward -----------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
        """Hidden states [B, L, D] of a packed batch (only its input keys are read)."""
        mask = attention.train_spec(batch["segment_ids"], batch["image_block"],
                                    bool(_cfg(self.model_cfg, "image_bidirectional_context")))
        hidden, _ = self._backbone(batch, mask, train=train)
        return hidden

    def decode(self, chunk: Mapping[str, jax.Array], cache: dict[str, Any]):
        """Runs T new positions against the cache -> (hidden [B, T, D], updated cache)."""
        missing = [k for k in CHUNK_KEYS if k not in chunk]
        if missing:
            raise ValueError(f"decode chunk is missing {missing} (needs {CHUNK_KEYS}).")
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
            bool(_cfg(self.model_cfg, "image_bidirectional_context")))
        hidden, kv = self._backbone(chunk, mask, cache["layers"], index, train=False)
        hidden = jnp.where(index + t > size, jnp.nan, hidden)
        new_cache = {"index": index + t, "segment_ids": seg, "image_block": blk,
                     "layers": tuple({"k": k, "v": v} for k, v in kv)}
        return hidden, new_cache

    def init_cache(self, batch_size: int, max_len: int | None = None) -> dict[str, Any]:
        """Same as the module-level `init_cache` (convenience under `apply`)."""
        return init_cache(self.model_cfg, batch_size, max_len)

    # ---- heads -------------------------------------------------------------------------------
    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Text logits, float32 [..., vocab_size]."""
        if _cfg(self.model_cfg, "tie_embeddings"):
            table = self.embed.embedding.astype(self.dtype)
            return jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), table,
                              preferred_element_type=jnp.float32)
        return self.lm_head(hidden)

    def flow_velocity(self, hidden: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Velocity [..., d] at noisy codes x_t [..., d] and times t [...]; hidden [..., D]
        broadcasts against x_t's leading dims (e.g. [B, L, D] with x_t [K, B, L, d])."""
        if _cfg(self.model_cfg, "image_head") != "flow":
            raise ValueError("flow_velocity needs model.image_head='flow' "
                             f"(got {_cfg(self.model_cfg, 'image_head')!r}).")
        return self.flow_head(hidden, x_t, t)

    def index_logits(self, hidden: jax.Array) -> tuple[jax.Array, ...]:
        """FSQ-index logits: a 1-tuple [..., prod(levels)], or one [..., L_i] per FSQ channel
        when model.discrete_factorized (see heads.index_nll / index_argmax)."""
        if _cfg(self.model_cfg, "image_head") != "discrete":
            raise ValueError("index_logits needs model.image_head='discrete' "
                             f"(got {_cfg(self.model_cfg, 'image_head')!r}).")
        return self.index_head(hidden)

    def init_all(self, batch: Mapping[str, jax.Array]):
        """Touches every parameter (backbone and the configured heads); use as `init` method."""
        hidden = self(batch)
        out = [self.lm_logits(hidden)]
        if _cfg(self.model_cfg, "image_head") == "flow":
            x = batch["codes"].astype(jnp.float32)
            out.append(self.flow_velocity(hidden, x, jnp.zeros(x.shape[:-1])))
        else:
            out.append(self.index_logits(hidden))
        return out


def init_params(model: MultimodalLM, rng: jax.Array, batch: Mapping[str, jax.Array]):
    """Boxed (logically partitioned) params of every module the config uses."""
    return model.init(rng, batch, method=MultimodalLM.init_all)["params"]
