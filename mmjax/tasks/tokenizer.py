"""The FSQ autoencoder as a trainer task (its stage, evaluation and loading: mmjax.stages.tokenizer)."""
from __future__ import annotations

from mmjax.data import pipeline
from mmjax.tokenizers import autoencoder as ae


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

    def loss_fn(self, params, batch, rng, train):
        return ae.autoencoder_loss_fn(self.model, params, batch, rng, self.config)
