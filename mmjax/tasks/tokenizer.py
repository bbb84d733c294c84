"""The FSQ autoencoder as a trainer task (its stage, evaluation and loading: mmjax.stages.tokenizer)."""
from __future__ import annotations

from mmjax.data import pipeline
from mmjax.tokenizers import autoencoder as ae
from mmjax.tokenizers import vq


class TokenizerTask:
    """Trains `FSQAutoencoder` on the images of `config.data` with the `tokenizer_train` block.

    Built once per run from the config and the data dir (`Workdir.data_dir`); the data stage must
    have built the dataset (reading it otherwise fails naming `--mode=data`).
    """

    name = "tokenizer"

    def __init__(self, config, data_dir):
        self.config = config
        self.train_config = config.tokenizer_train
        self.data_dir = data_dir
        self.model = ae.autoencoder_from_config(config)

    def dataset(self, split: str, *, train: bool):
        ds = pipeline.image_caption_dataset(self.config.data, split, self.data_dir)
        return ds.map(lambda r: {"image": r["image"]})

    def init_params(self, rng, batch):
        return self.model.init(rng, ae.images_to_float(batch["image"]))["params"]

    def init_model_state(self, rng, batch):
        """The EMA codebook collection of a VQ tokenizer (`vq.VQAutoencoder`); None otherwise."""
        if not ema_vq(self.config):
            return None
        return self.model.init(rng, ae.images_to_float(batch["image"]))["vq"]

    def loss_fn(self, params, batch, rng, train):
        if quantizer(self.config) == "vq":  # codebook learned by gradient: no model state
            loss, (metrics, _) = vq.vq_loss_fn(self.model, {"params": params}, batch, rng,
                                               self.config, train)
            return loss, metrics
        return ae.autoencoder_loss_fn(self.model, params, batch, rng, self.config)

    def loss_fn_with_state(self, params, model_state, batch, rng, train):
        return vq.vq_loss_fn(self.model, {"params": params, "vq": model_state}, batch, rng,
                             self.config, train)


def quantizer(config) -> str:
    return config.fsq.get("quantizer", "fsq")


def ema_vq(config) -> bool:
    """A VQ tokenizer whose codebook follows moving averages (trainer-held model state)."""
    return quantizer(config) == "vq" and float(config.fsq.vq_ema_decay) > 0
