"""ModelConfig: the validated, frozen `model` block the model code reads (no ConfigDict here).

Why typed: flax's lm1b example hands its Transformer a frozen `TransformerConfig`; so do we. Values
are checked once, where the config enters (config_validation.model_config, the only builder), so
the modules below take them as given. Frozen and hashable, so flax modules can hold it as a field
and jit can close over it.

`head` is the image-head registry entry (mmjax.image_heads.ImageHead) that the builder resolved
from `model.image_head`: the model builds its head module from it, the objective, sampler and
FLOPs counts call its functions. models/ never imports the registry (which imports the sampler and
the objective), so there is no import circle.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field of config_defaults.model_config (same names and meaning), plus the text
    vocabulary size, the index levels and code width of the image tokens and the image grid's
    side."""

    num_modalities: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    max_seq_len: int
    mot_impl: str
    mot_tile: int
    attention_impl: str
    attention_block: int
    image_bidirectional_context: bool
    head: Any  # mmjax.image_heads.ImageHead (registry entry of model.image_head)
    discrete_factorized: bool
    tie_embeddings: bool
    flow_depth: int
    flow_width: int
    flow_t_samples: int
    noise_aug: float
    image_positions: str
    image_input: str
    dtype: str
    remat: str
    vocab_size: int
    # Mixed-radix digits of an image-token index: the FSQ levels, or (K,) for a learned (VQ)
    # codebook of K codes (mmjax.tokenizers.vq.LearnedCodebook.levels).
    fsq_levels: tuple[int, ...]
    # Image tokens per side (data.image_size // the tokenizer's downsampling); 0 = not given
    # (only the 2-D model.image_positions need it, to split a token's index into row, col).
    image_side: int = 0
    # Code-vector width of a learned (VQ) codebook (fsq.vq_dim); 0 = FSQ tokens, whose code has
    # one channel per level.
    vq_dim: int = 0
    # Most image tokens one packed row of max_seq_len holds (the packer's layout:
    # config_validation.model_config); 0 = unknown. With two modalities it sizes the static
    # buckets of mot_impl "buckets" (and "auto" on CPU) for full-length rows (mot.make_bucket_routing).
    image_capacity: int = 0
    # Consecutive rows whose image tokens together obey image_capacity x bucket_rows (and text
    # the rest): 1 for the fixed packer's per-row bound, objective.direction_group_rows for
    # data.packing="first_fit", whose groups share their buckets (mot.bucket_blocks).
    bucket_rows: int = 1

    @property
    def image_head(self) -> str:
        """The `model.image_head` name ("flow" | "discrete" | ...)."""
        return self.head.name

    @property
    def grid_embedding(self) -> bool:
        """Image tokens' row and column are added to their input embedding (a 2-D
        model.image_positions other than "rope_2d", which rotates queries and keys instead)."""
        return self.image_positions in ("learned_2d", "sincos_2d")

    @property
    def code_dim(self) -> int:
        """Dimension d of an image token's code vector (len(fsq_levels) for FSQ, else vq_dim)."""
        return self.vq_dim or len(self.fsq_levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads
