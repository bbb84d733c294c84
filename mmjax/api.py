"""The Python API: load a run from its workdir and generate from plain strings and arrays.

    import mmjax
    run = mmjax.load("/tmp/mmjax_demo")                 # newest checkpoint (or step=...)
    images = run.text_to_image(["a large red circle at the top left"])   # uint8 [1, H, W, 3]
    captions = run.caption(images)                      # list[str]
    recons = run.reconstruct(images)                    # through the FSQ tokenizer
    chain = run.interleave("a small blue square", rounds=2)

Why an object: loading is the slow part (config, SentencePiece, tokenizer and model checkpoints,
compiled samplers), so it happens once; each call then tokenizes inside, batches to the sampler's
compiled size (`sample.batch_size`; the last batch is padded) and compiles once per shape and
setting. The config comes from the model checkpoint itself (what the run was trained with), so a
workdir is all a user needs. The sample stage scores through the same object (one code path).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from mmjax import (checkpointing, config_defaults, config_validation, ema, image_codebook,
                   layout, sampling)
from mmjax.data import text
from mmjax.errors import InputError
from mmjax.models import model as model_lib
from mmjax.stages import tokenizer as tokenizer_stage
from mmjax.tasks.multimodal import build_model
from mmjax.tokenizers import autoencoder as ae
from mmjax.workdir import Workdir


def load(workdir, *, step: int | None = None, config=None) -> "Run":
    """A Run restored from `workdir` (a finished or in-progress one) onto the local devices.

    step: the model checkpoint to load (default: the newest readable one). config: defaults to
    the config stored beside that checkpoint.
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
        raise InputError(f"step={step!r} must be an integer checkpoint step (or None: the newest)")
    root = Workdir.from_config({}, workdir)  # where the checkpoints are
    if config is None:
        checkpointing.require_directory(root.model_checkpoints)
        config = with_defaults(checkpointing.restore_config(str(root.model_checkpoints),
                                                            step=step))
    return Run(config, Workdir.from_config(config, root.root), step=step)


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
    """A checkpoint's config JSON over today's defaults: a run saved before a field existed
    loads with that field's default (JSON lists back to tuples where the default is one)."""
    config = config_defaults.base_config()

    def merge(node, values):
        for key, value in values.items():
            default = node.get(key) if key in node else None
            if isinstance(value, dict) and isinstance(default, ml_collections.ConfigDict):
                merge(default, value)
            elif isinstance(default, tuple) and isinstance(value, list):
                node[key] = tuple(value)
            else:
                node[key] = value

    merge(config, stored)
    return config


def example_batch(config) -> dict:
    """A zero batch [1, max_seq_len] with the model's input keys (for shapes only)."""
    length, d = int(config.model.max_seq_len), config_validation.image_token_codes(config)[1]
    batch = {k: np.zeros((1, length), np.int32) for k in model_lib.CHUNK_KEYS if k != "codes"}
    return {**batch, "codes": np.zeros((1, length, d), np.float32)}


class Run:
    """A trained tokenizer + model pair with string/array in, string/array out methods."""

    def __init__(self, config, workdir: Workdir, *, step: int | None = None, params=None):
        """Restores the model checkpoint (`step`, default newest), or takes `params` as given
        (host arrays: the trainer's periodic samples use the params being trained)."""
        self.config, self.workdir = config, workdir
        self.tokenizer = text.load_text_tokenizer(workdir.sp_model,
                                                  users=workdir.sp_model_is_users)
        self.special = layout.special_ids(self.tokenizer)
        self.model = build_model(config, self.tokenizer.vocab_size)
        self.step, self.params = self._restore(step) if params is None else (step, params)
        self.ae_model, self.ae_params = tokenizer_stage.load_tokenizer(config, workdir)
        self.image_size = int(config.data.image_size)
        side = self.image_size // self.ae_model.downsample
        self.grid = (side, side)
        self.num_image_tokens = side * side
        self.max_caption_len = int(config.data.max_caption_len)
        self.batch_size = int(config.sample.batch_size)
        self.settings = config_validation.sample_settings(config.sample)
        self.codebook = image_codebook.load(config, workdir)  # FSQ grid or the VQ table
        self._encode = jax.jit(lambda imgs: ae.tokenize(self.ae_model, self.ae_params,
                                                        ae.images_to_float(imgs)))
        self._decode = jax.jit(lambda idx: ae.float_to_images(
            ae.detokenize(self.ae_model, self.ae_params, idx, self.grid)))

    def _restore(self, step):
        abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(
            self.model, jax.random.PRNGKey(0), example_batch(self.config))))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                abstract)
        return checkpointing.restore_params(str(self.workdir.model_checkpoints), abstract,
                                            step=step, key=ema.model_params_key(self.config))

    # ---- settings and compiled samplers ---------------------------------------------------------
    def settings_with(self, **overrides) -> sampling.SampleSettings:
        """The run's sampling settings with the non-None `overrides` replaced, checked by the
        sample block's own rules (config_validation.sample_settings): ode_steps=0 or a
        negative temperature is one InputError, never noise images or an inverted softmax."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self.settings
        try:
            return config_validation.sample_settings(
                {**dataclasses.asdict(self.settings), **changes})
        except config_validation.ConfigError as e:
            raise InputError(f"sampling override {e}") from None

    @functools.lru_cache(maxsize=8)
    def sampler(self, settings: sampling.SampleSettings) -> sampling.Sampler:
        """The jitted sampler for `settings` (cached: one compile per setting and shape)."""
        return sampling.Sampler(self.model, settings, self.special, self.num_image_tokens,
                                codebook=self.codebook)

    # ---- inputs ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Caption ids [N, max_caption_len] and lengths [N]; ValueError for bad prompts."""
        if isinstance(prompts, str) or not len(prompts):
            raise InputError("prompts must be a non-empty list of strings")
        ids = np.zeros((len(prompts), self.max_caption_len), np.int32)
        lengths = np.zeros(len(prompts), np.int32)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
            if not prompt.strip():
                raise InputError(f"prompt {i} is empty (the unconditional prompt is the "
                                 "sampler's own <uncond> marker, not an empty caption)")
            unknown = self.tokenizer.unknown_pieces(prompt)
            if unknown:
                raise InputError(f"prompt {i} holds pieces the run's SentencePiece model cannot "
                                 f"encode ({', '.join(map(repr, unknown))}): {prompt!r}")
            tokens = self.tokenizer.encode(prompt)
            if len(tokens) > self.max_caption_len:
                raise InputError(f"prompt {i} has {len(tokens)} tokens, more than the model's "
                                 f"data.max_caption_len={self.max_caption_len}: {prompt!r}")
            ids[i, :len(tokens)], lengths[i] = tokens, len(tokens)
        return ids, lengths

    def check_images(self, images) -> np.ndarray:
        """uint8 [N, S, S, 3] with S = data.image_size, or one clear ValueError."""
        try:
            images = np.asarray(images)
        except ValueError as e:  # a ragged list
            raise InputError(f"images must be one uint8 array [N, S, S, 3]: {e}") from None
        want = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want or not len(images):
            raise InputError(f"images must be uint8 [N, {want[0]}, {want[1]}, 3] with N >= 1 "
                             f"(the run's data.image_size); got {images.dtype} {images.shape}")
        return images

    # ---- token-level calls (the sample stage scores through these) --------------------------------
    def map_batches(self, fn, arrays: list[np.ndarray], seed: int):
        """Concatenated fn(*batch, key) over batches padded to `batch_size` (one compile)."""
        size = min(self.batch_size, len(arrays[0]))
        rng, outs = jax.random.PRNGKey(int(seed)), []
        for start in range(0, len(arrays[0]), size):
            real = np.arange(start, min(start + size, len(arrays[0])))
            idx = np.concatenate([real, np.full(size - len(real), real[-1])])
            out = jax.device_get(fn(*(a[idx] for a in arrays), jax.random.fold_in(rng, start)))
            outs.append(jax.tree.map(lambda x: np.asarray(x)[:len(real)], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def image_tokens_for(self, ids, lengths, *, seed: int = 0, settings=None) -> np.ndarray:
        """Image-token indices [N, n] generated for caption ids [N, T] / lengths [N]."""
        sampler = self.sampler(settings or self.settings)
        out = self.map_batches(lambda i, n, k: sampler.text_to_image(self.params, i, n, k),
                               [ids, lengths], seed)
        return out["indices"]

    def captions_for_tokens(self, indices, *, seed: int = 0, settings=None) -> list[str]:
        """Captions of images given as image-token indices [N, n]."""
        sampler = self.sampler(settings or self.settings)
        codes = self.codebook.indices_to_codes(np.asarray(indices, np.int32))
        out = self.map_batches(lambda c, k: sampler.image_to_text(self.params, c, k), [codes], seed)
        return [self.tokenizer.decode(t) for t in out["tokens"]]

    def pixels(self, indices) -> np.ndarray:
        """uint8 images [N, S, S, 3] of image-token indices [N, n] (the tokenizer's decoder)."""
        return self.map_batches(lambda i, _: self._decode(i), [np.asarray(indices, np.int32)], 0)

    def tokens_of(self, images) -> np.ndarray:
        """Image-token indices [N, n] of uint8 images (the tokenizer's encoder)."""
        return self.map_batches(lambda x, _: self._encode(x), [self.check_images(images)], 0)

    # ---- the public calls -------------------------------------------------------------------------
    def text_to_image(self, prompts: Sequence[str], *, seed: int = 0, cfg_scale=None,
                      ode_steps=None, temperature=None) -> np.ndarray:
        """uint8 images [N, S, S, 3] for the prompts. temperature: the flow head's noise scale
        (or the discrete head's sampling temperature); None keeps the run's `sample` settings."""
        ids, lengths = self.encode_prompts(prompts)
        settings = self.settings_with(cfg_scale=cfg_scale, ode_steps=ode_steps,
                                      **{self.model.cfg.head.temperature_field: temperature})
        return self.pixels(self.image_tokens_for(ids, lengths, seed=seed, settings=settings))

    def caption(self, images, *, seed: int = 0, temperature=None) -> list[str]:
        """One caption per uint8 image [N, S, S, 3] (text temperature override optional)."""
        tokens = self.tokens_of(images)
        return self.captions_for_tokens(tokens, seed=seed,
                                        settings=self.settings_with(temperature=temperature))

    def reconstruct(self, images) -> np.ndarray:
        """The images through the FSQ tokenizer (encode, quantise, decode): the ceiling."""
        return self.pixels(self.tokens_of(images))

    def interleave(self, prompt: str, rounds: int = 2, *, seed: int = 0) -> list[dict]:
        """prompt -> image -> its caption -> image of that caption ...: `rounds` x {image,
        caption} (each caption describes the image before it)."""
        if not isinstance(prompt, str):
            raise InputError("interleave takes one prompt string")
        if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
            raise InputError(f"rounds={rounds!r} must be an integer >= 1")
        ids, lengths = self.encode_prompts([prompt])
        chain = jax.device_get(self.sampler(self.settings).interleaved(
            self.params, ids, lengths, jax.random.PRNGKey(int(seed)), rounds=int(rounds)))
        images = self.pixels(chain["indices"][0])
        return [{"image": images[r], "caption": self.tokenizer.decode(chain["tokens"][0, r])}
                for r in range(int(rounds))]
