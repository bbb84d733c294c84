"""The text <-> image Mixture-of-Transformers as a trainer task.

Data: (image, caption) records + precomputed FSQ tokens -> tokenized examples -> packed rows
(mmjax.data.packing). Each example appears `objective.direction_redraws` times per pass with an
independently drawn direction (text->image or image->caption) and caption dropout, so every image
is both generated and captioned over training while rows stay random-access (exactly resumable).
"""
from __future__ import annotations

import functools

import grain
import numpy as np

from mmjax import config_validation, objectives
from mmjax.data import packing, pipeline, text
from mmjax.models import model as model_lib
from mmjax.tasks import image_tokens
from mmjax.tokenizers.fsq import FSQ


@functools.lru_cache(maxsize=8)
def _text_tokenizer(path: str) -> text.TextTokenizer:
    return text.TextTokenizer(path)


def text_tokenizer(config, workdir: str) -> text.TextTokenizer:
    return _text_tokenizer(text.ensure_text_tokenizer(config.data, workdir))


def build_model(config, vocab_size: int) -> model_lib.MultimodalLM:
    """MultimodalLM of the config's checked ModelConfig (model block + vocab + fsq.levels)."""
    return model_lib.MultimodalLM(config_validation.model_config(config, int(vocab_size)))


def encode_caption(tokenizer, caption: str, max_len: int) -> tuple[np.ndarray, int]:
    """Caption ids padded to `max_len`; a clear error if the caption does not fit."""
    ids = tokenizer.encode(caption)
    if len(ids) > max_len:
        raise ValueError(f"caption {caption!r} has {len(ids)} tokens > data.max_caption_len="
                         f"{max_len}; raise data.max_caption_len (and model.max_seq_len)")
    out = np.zeros(max_len, np.int32)
    out[: len(ids)] = ids
    return out, len(ids)


def tokenized_examples(config, workdir: str, split: str) -> grain.MapDataset:
    """{caption_ids, caption_len, image_indices} per record of `split`."""
    records = pipeline.image_caption_dataset(config.data, split, workdir)
    tokens = image_tokens.load_tokens(workdir, split, len(records), config)
    tok = text_tokenizer(config, workdir)
    max_len = int(config.data.max_caption_len)

    def make(i: int) -> dict:
        ids, n = encode_caption(tok, records[i]["caption"], max_len)
        return {"caption_ids": ids, "caption_len": np.int32(n), "image_indices": tokens[i]}

    return grain.MapDataset.range(len(records)).map(make)


def packed_dataset(config, workdir: str, split: str, *, train: bool) -> grain.MapDataset:
    examples = tokenized_examples(config, workdir, split)
    redraws = int(config.objective.direction_redraws) if train else 1
    n = len(examples)
    parent = grain.MapDataset.range(n * redraws).map(lambda i: examples[i % n])
    tok = text_tokenizer(config, workdir)
    obj = config.objective
    return packing.PackedDataset(
        parent, seq_len=int(config.model.max_seq_len), special=packing.special_ids(tok),
        index_to_code=FSQ(tuple(config.fsq.levels)).codebook(),
        t2i_prob=float(obj.t2i_prob), caption_dropout=float(obj.caption_dropout) if train else 0.0,
        seed=int(config.data.seed) + (0 if train else 1))


class MultimodalTask:
    """Trains MultimodalLM on packed text/image sequences with the `train` block."""

    name = "model"

    def train_config(self, config):
        return config.train

    def __init__(self):
        self._vocab_size = None

    def prepare(self, config, workdir: str) -> None:
        """Checks the tokens exist and fixes the text vocabulary (the model's vocab size)."""
        self._vocab_size = text_tokenizer(config, workdir).vocab_size
        for split in ("train", "validation"):
            image_tokens.load_tokens(workdir, split, len(
                pipeline.image_caption_dataset(config.data, split, workdir)), config)

    def dataset(self, config, workdir: str, split: str, *, train: bool):
        return packed_dataset(config, workdir, split, train=train)

    def init_params(self, config, rng, batch):
        return model_lib.init_params(self.model(config), rng, batch)

    def loss_fn(self, config, params, batch, rng, train):
        return objectives.compute_losses(self.model(config), params, batch, rng,
                                         config_validation.objective_config(config.objective),
                                         train=train)

    def model(self, config) -> model_lib.MultimodalLM:
        if self._vocab_size is None:
            raise RuntimeError("MultimodalTask.prepare() must run before the model is built")
        return build_model(config, self._vocab_size)
