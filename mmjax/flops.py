"""Analytic parameter counts and FLOPs per token for the MoT / dense MultimodalLM; MFU.

Why analytic: MFU, scaling-law compute budgets (C) and the MoT-vs-dense comparison all need the
FLOPs a model *requires*, independent of how well an implementation runs on a given chip (XLA's
cost analysis counts what was compiled, including padding and rematerialisation).

What is counted (the model of `mmjax/models/`):
- Backbone, per layer and per modality: RMSNorm scales before attention and before the FFN,
  Q/K/V/O projections (no biases, num_heads * head_dim = d_model), SwiGLU gate/up/down
  (d_model x mlp_dim, no biases); a final per-modality RMSNorm. MoT keeps one copy of all of these
  per modality, so total parameters grow with num_modalities while a token only ever uses its own
  modality's copy: active parameters and FLOPs per token equal the dense model's (Liang et al.).
- Inputs: the text embedding table (a gather: 0 FLOPs) and the image input projection from the FSQ
  code vector (dim d = len(levels)) to d_model (no bias).
- Heads: the LM head (d_model x vocab; no extra parameters when model.tie_embeddings, same FLOPs)
  at text-target positions; the image head at image-target positions, counted by its registry
  entry (mmjax/image_heads.py) with the helpers here: either the flow head (an AdaLN residual MLP
  of width flow_width and depth flow_depth, run flow_t_samples times per position, see
  `flow_head_counts`) or the discrete head (d_model x prod(levels), or d_model x sum(levels) when
  factorised; no bias, see `discrete_head_counts`).

The functions take a checked `ModelConfig` (config_validation.model_config / model_block), which
holds the vocabulary size and the FSQ levels; sizes are not re-validated here.

Conventions (state them when quoting numbers):
- A matmul [m, k] x [k, n] costs 2*m*k*n FLOPs (a multiply-add is 2 FLOPs). Norms, softmax,
  activations, RoPE and gathers are not counted (they are < 1% at any size worth measuring).
- Attention scores QK^T and the AV product cost 2 * 2 * ctx * d_model per token and layer, where
  ctx is the number of keys a query sees. `causal=True` (default) uses ctx = seq_len / 2, the
  average over a causal sequence, as MaxText does today (it halves its non-causal count).
  PaLM's MFU (6N + 12 L H Q T) and Chinchilla count the full seq_len; pass `causal=False` for
  those. Bidirectional attention inside context images and document boundaries of packed
  sequences are ignored (both only change ctx slightly).
- Heads run only where their target is: `image_fraction` is the fraction of positions whose next
  token is an image target (the flow / discrete head and, as a proxy for image inputs, the image
  input projection); `text_fraction` the fraction with a text target (the LM head; default: all
  the rest, 1 - image_fraction). This is the work the model needs; the objective runs the heads
  on a static per-row capacity of target slots (mmjax/targets.py), which is at least this.
- Training = 3 x forward (the backward pass costs twice the forward: gradients with respect to
  activations and to weights), which gives the familiar 6N per token.
"""
from __future__ import annotations

import math

from mmjax.choices import CHOICES

# Peak dense bf16 matmul throughput per device (FLOP/s), from vendor datasheets (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12,  # H100 SXM (PCIe: see below)
    "h100 pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5e": 197e12,  # jax device_kind "TPU v5 lite"
    "tpu v5p": 459e12,  # jax device_kind "TPU v5" / "TPU v5p"
    "tpu v6e": 918e12,  # Trillium; jax device_kind "TPU v6 lite"
}


# ----------------------------------------------------------------------------- components
# Each returns (parameters, forward FLOPs per application) for one component.


def _block(d: int, mlp: int) -> tuple[int, int]:
    """One modality's copy of one transformer block (attention scores counted separately)."""
    matmul = 4 * d * d + 3 * d * mlp  # Q, K, V, O + SwiGLU gate, up, down
    return matmul + 2 * d, 2 * matmul  # + two RMSNorm scales


def flow_head_counts(d_model: int, code_dim: int, width: int, depth: int) -> tuple[int, int, int]:
    """The AdaLN residual MLP of heads.FlowHead -> (params, FLOPs per position, FLOPs per sample).

    Per position (once, shared by all t-samples): cond_proj d_model->W. Per (t, noise) sample:
    t-MLP W->W->W on the sinusoidal features (width W), x_proj code_dim->W, each block's
    modulation W->3W and MLP W->W->W, final modulation W->2W, out W->code_dim. Every Dense has a
    bias; LayerNorms have no parameters.
    """
    per_sample = (2 * width * width + code_dim * width + depth * (3 + 2) * width * width
                  + 2 * width * width + width * code_dim)
    biases = 3 * width + width + depth * (3 + 2) * width + 2 * width + code_dim
    return d_model * width + per_sample + biases, 2 * d_model * width, 2 * per_sample


def discrete_head_counts(d_model: int, levels: tuple[int, ...], factorized: bool
                         ) -> tuple[int, int]:
    """The heads.IndexHead kernel -> (params, FLOPs per position)."""
    out = sum(levels) if factorized else math.prod(levels)
    return d_model * out, 2 * d_model * out


# ----------------------------------------------------------------------------- public


def param_counts(cfg) -> dict[str, int]:
    """Parameter counts of MultimodalLM(cfg) for a ModelConfig `cfg`.

    Keys: total; active_per_token (what one token's forward touches = the dense model's total);
    embedding (input tables: text embedding + image input projection [+ 2-D image position tables]); non_embedding (total -
    embedding); per_modality (one modality's backbone: its blocks' weights and final norm);
    backbone (all modalities); lm_head (0 when tied to the embedding); image_head.
    """
    c = cfg
    d, m = c.d_model, c.num_modalities
    per_modality = c.num_layers * _block(d, c.mlp_dim)[0] + d  # + final RMSNorm scale
    embedding = c.vocab_size * d + c.code_dim * d  # text table + image input projection
    if c.image_positions == "learned_2d":
        embedding += 2 * c.image_side * d  # row and column tables (lookups: no FLOPs counted)
    if c.image_input == "code+index":
        embedding += c.codebook_size * d  # index table of image tokens (a lookup, like text's)
    lm_head = 0 if c.tie_embeddings else d * c.vocab_size
    image_head = c.head.param_count(c)
    total = embedding + m * per_modality + lm_head + image_head
    return dict(total=total, active_per_token=total - (m - 1) * per_modality,
                embedding=embedding, non_embedding=total - embedding, per_modality=per_modality,
                backbone=m * per_modality, lm_head=lm_head, image_head=image_head)


def flops_per_token(cfg, seq_len: int, image_fraction: float, *,
                    causal: bool = True, text_fraction: float | None = None) -> dict[str, float]:
    """Forward / training FLOPs per token of MultimodalLM(cfg) for a ModelConfig `cfg`, averaged
    over a sequence of `seq_len` positions.

    Keys: forward, train (= 3 x forward), backbone (block matmuls), attention (QK^T and AV),
    input_proj (image input projection), lm_head, flow_head / discrete_head (the image head in
    use, keyed `<image_head>_head`; the others are 0), six_n (6 x active non-embedding
    parameters: the usual approximation of `train`, for comparison). Independent of
    num_modalities by construction (see module doc).
    """
    if int(seq_len) != seq_len or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r}: must be a positive integer")
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction={image_fraction!r}: must be in [0, 1]")
    if text_fraction is None:
        text_fraction = 1.0 - image_fraction
    if not 0.0 <= text_fraction <= 1.0 - image_fraction + 1e-9:
        raise ValueError(f"text_fraction={text_fraction!r}: must be in [0, 1 - image_fraction]")
    c = cfg
    d, n_layers = c.d_model, c.num_layers
    ctx = seq_len / 2 if causal else float(seq_len)
    backbone = n_layers * _block(d, c.mlp_dim)[1]
    attention = n_layers * 2 * 2 * ctx * d
    input_proj = image_fraction * 2 * c.code_dim * d
    lm_head = text_fraction * 2 * d * c.vocab_size
    image = {f"{name}_head": 0.0 for name in CHOICES["model.image_head"]}
    image[f"{c.image_head}_head"] = image_fraction * c.head.flops_per_position(c)
    forward = backbone + attention + input_proj + lm_head + sum(image.values())
    counts = param_counts(c)
    active_non_embedding = counts["active_per_token"] - counts["embedding"]
    return dict(forward=forward, train=3.0 * forward, backbone=backbone, attention=attention,
                input_proj=input_proj, lm_head=lm_head, **image, six_n=6.0 * active_non_embedding)


def mfu(tokens_per_second: float, train_flops_per_token: float, peak_flops_per_second: float,
        num_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak.

    `tokens_per_second` is the global throughput (all devices together).
    """
    if peak_flops_per_second <= 0 or num_devices <= 0:
        raise ValueError(f"mfu: peak_flops_per_second={peak_flops_per_second!r} and "
                         f"num_devices={num_devices!r} must be > 0")
    if tokens_per_second < 0 or train_flops_per_token < 0:
        raise ValueError("mfu: tokens_per_second and train_flops_per_token must be >= 0")
    return tokens_per_second * train_flops_per_token / (peak_flops_per_second * num_devices)


def peak_flops_for_device(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a `jax.Device.device_kind` string, or None when unknown (e.g. CPU).

    Matches the strings jax reports: "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "TPU v4",
    "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p", "TPU v6 lite" (v6e).
    """
    kind = " ".join(str(device_kind).lower().replace("-", " ").split())
    if "h100" in kind:
        return PEAK_FLOPS["h100 pcie"] if "pcie" in kind else PEAK_FLOPS["h100"]
    for name in ("h200", "a100"):
        if name in kind:
            return PEAK_FLOPS[name]
    if "tpu" in kind:
        if "v6" in kind:
            return PEAK_FLOPS["tpu v6e"] if ("lite" in kind or "v6e" in kind) else None
        if "v5" in kind:
            return PEAK_FLOPS["tpu v5e"] if ("lite" in kind or "v5e" in kind) \
                else PEAK_FLOPS["tpu v5p"]
        if "v4" in kind:
            return PEAK_FLOPS["tpu v4"]
    return None


def summary(cfg, image_fraction: float) -> dict:
    """Convenience for logs / benchmarks: counts and FLOPs of a ModelConfig at its max_seq_len."""
    return dict(params=param_counts(cfg),
                flops=flops_per_token(cfg, cfg.max_seq_len, image_fraction))
