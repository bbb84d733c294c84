"""The FSQ autoencoder as a trainer task, plus its evaluation (PSNR, codebook usage, PNG grid)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from mmjax import checkpointing
from mmjax.data import pipeline
from mmjax.evals import recon
from mmjax.tokenizers import autoencoder as ae


class TokenizerTask:
    """Trains `FSQAutoencoder` on the images of `config.data` with the `tokenizer_train` block."""

    name = "tokenizer"

    def train_config(self, config):
        return config.tokenizer_train

    def prepare(self, config, workdir: str) -> None:
        for split in ("train", "validation"):
            pipeline.image_caption_dataset(config.data, split, workdir)

    def dataset(self, config, workdir: str, split: str, *, train: bool):
        ds = pipeline.image_caption_dataset(config.data, split, workdir)
        return ds.map(lambda r: {"image": r["image"]})

    def init_params(self, config, rng, batch):
        model = ae.autoencoder_from_config(config)
        return model.init(rng, ae.images_to_float(batch["image"]))["params"]

    def init_model_state(self, config, rng, batch):
        """The EMA codebook collection of a VQ tokenizer (`vq.VQAutoencoder`); None otherwise."""
        if not _ema_vq(config):
            return None
        model = ae.autoencoder_from_config(config)
        return model.init(rng, ae.images_to_float(batch["image"]))["vq"]

    def loss_fn(self, config, params, batch, rng, train):
        model = ae.autoencoder_from_config(config)
        if _quantizer(config) == "vq":  # codebook learned by gradient: no model state
            from mmjax.tokenizers import vq
            loss, (metrics, _) = vq.vq_loss_fn(model, {"params": params}, batch, rng, config,
                                               train)
            return loss, metrics
        return ae.autoencoder_loss_fn(model, params, batch, rng, config)

    def loss_fn_with_state(self, config, params, model_state, batch, rng, train):
        from mmjax.tokenizers import vq
        return vq.vq_loss_fn(ae.autoencoder_from_config(config),
                             {"params": params, "vq": model_state}, batch, rng, config, train)


def _quantizer(config) -> str:
    return config.fsq.get("quantizer", "fsq")


def _ema_vq(config) -> bool:
    return _quantizer(config) == "vq" and float(config.fsq.vq_ema_decay) > 0


def checkpoint_dir(config, workdir: str) -> str:
    return config.fsq.checkpoint_dir or os.path.join(workdir, "tokenizer", "checkpoints")


def load_tokenizer(config, workdir: str):
    """(model, params) of the trained tokenizer; a clear error when it has not been trained."""
    model = ae.autoencoder_from_config(config)
    directory = checkpoint_dir(config, workdir)
    abstract = jax.eval_shape(lambda: _unboxed_init(model, config.data.image_size))
    if "vq" not in abstract:
        _, params = checkpointing.restore_params(directory, abstract["params"])
        return model, params
    # EMA VQ: the codebook is the trainer's model_state; the weights are the variables dict.
    _, items = checkpointing.restore_state_items(
        directory, {"params": abstract["params"], "model_state": abstract["vq"]})
    return model, {"params": items["params"], "vq": items["model_state"]}


def _unboxed_init(model, image_size):
    from flax import linen as nn
    return nn.unbox(ae.init_variables(model, jax.random.PRNGKey(0), image_size))


def evaluate_tokenizer(config, workdir: str, split: str = "validation",
                       max_images: int = 512) -> dict:
    """PSNR, codebook usage and perplexity on `split`; writes eval JSON and a recon PNG grid."""
    model, params = load_tokenizer(config, workdir)
    recon_fn = ae.make_recon_fn(model, params)
    ds = pipeline.image_caption_dataset(config.data, split, workdir)
    n = min(len(ds), max_images)
    bs = 64
    batches = ({"image": np.stack([ds[i]["image"] for i in range(s, min(s + bs, n))])}
               for s in range(0, n, bs))
    metrics = recon.evaluate_autoencoder(recon_fn, batches, model.codebook_size)
    out_dir = os.path.join(workdir, "tokenizer")
    originals = np.stack([ds[i]["image"] for i in range(min(16, n))])
    recons, _ = recon_fn(originals)
    recon.save_reconstruction_grid(originals, np.asarray(recons),
                                   os.path.join(out_dir, f"reconstructions_{split}.png"))
    metrics = {f"{split}_{k}": float(v) for k, v in metrics.items()}
    metrics["codebook_size"] = model.codebook_size
    with open(os.path.join(out_dir, f"eval_{split}.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
