"""Every closed set of string choices a config field may take, written once.

Why a module of its own: config_validation checks these, and the modules that implement a choice
(models/mot.py, models/layers.py, sampling.py, objectives.py, image_heads.py) read their list
from here instead of typing it again. It imports nothing (no jax, no ml_collections), so
`mmjax/models/` may use it without reading a ConfigDict. config_defaults.py documents what each
choice means next to the field.
"""
from __future__ import annotations

CHOICES: dict[str, tuple[str, ...]] = {
    "fsq.loss": ("l2", "l1+l2"),
    "fsq.quantizer": ("fsq", "vq"),
    "model.mot_impl": ("auto", "ragged", "tiled", "buckets", "masked"),
    "model.attention_impl": ("auto", "reference", "chunked", "cudnn", "pallas", "splash"),
    # Keys of the image-head registry (mmjax/image_heads.py checks it holds exactly these).
    "model.image_head": ("flow", "discrete"),
    "model.image_positions": ("none", "learned_2d", "sincos_2d", "rope_2d"),
    "model.image_input": ("code", "code+index"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "objective.flow_t_dist": ("uniform", "logit_normal"),
    "train.nan_policy": ("stop", "skip"),
    "sample.ode_solver": ("euler", "heun"),
    "sample.cfg_schedule": ("constant", "linear"),
    "sample.weights": ("auto", "ema", "raw"),
    "data.long_captions": ("truncate", "drop", "error"),
    "data.packing": ("fixed", "first_fit"),
}
