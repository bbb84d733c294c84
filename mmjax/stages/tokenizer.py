"""The tokenizer stage: train the FSQ autoencoder, then score it (PSNR, codebook use, PNG grid).

`load_tokenizer` is how every later stage gets the trained tokenizer (load or fail, naming the
stage to run).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn

from mmjax import checkpointing, ema, io, train
from mmjax.data import pipeline
from mmjax import pictures
from mmjax.evals import recon
from mmjax.stages.common import finished
from mmjax.tasks.tokenizer import TokenizerTask
from mmjax.tokenizers import autoencoder as ae

EVAL_IMAGES = 512  # validation images scored after training (PSNR, codebook usage)
GRID_IMAGES = 16  # originals shown above their reconstructions in the PNG


def run(config, workdir) -> dict:
    summary = finished(train.train(config, workdir, TokenizerTask(config, workdir.data_dir)),
                       "tokenizer training")
    # Every process restores (orbax's restore is a collective), only process 0 scores and writes.
    loaded = load_tokenizer(config, workdir)
    metrics = evaluate(config, workdir, loaded=loaded) if jax.process_index() == 0 else {}
    return {"step": summary["step"], **metrics}


def load_tokenizer(config, workdir):
    """(model, params) of the trained tokenizer; a clear error when it has not been trained."""
    model = ae.autoencoder_from_config(config)
    abstract = jax.eval_shape(
        lambda: nn.unbox(ae.init_variables(model, jax.random.PRNGKey(0), config.data.image_size)))
    directory = str(workdir.tokenizer_checkpoints)
    params_key = ema.params_key(ema.decay_of(config.tokenizer_train))
    if "vq" not in abstract:
        _, params = checkpointing.restore_params(directory, abstract["params"], key=params_key)
        return model, params
    # EMA VQ: the codebook is the trainer's model_state; the weights are the variables dict.
    _, items = checkpointing.restore_state_items(
        directory, {params_key: abstract["params"], "model_state": abstract["vq"]})
    return model, {"params": items[params_key], "vq": items["model_state"]}


def evaluate(config, workdir, split: str = "validation", max_images: int = EVAL_IMAGES,
             loaded=None) -> dict:
    """PSNR, codebook usage and perplexity on `split`; writes eval JSON and a recon PNG grid.

    `loaded`: (model, params) from `load_tokenizer`, else loaded here."""
    model, params = loaded or load_tokenizer(config, workdir)
    recon_fn = ae.make_recon_fn(model, params)
    ds = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
    n = min(len(ds), max_images)
    bs = 64
    batches = ({"image": np.stack([ds[i]["image"] for i in range(s, min(s + bs, n))])}
               for s in range(0, n, bs))
    metrics = recon.evaluate_autoencoder(recon_fn, batches, model.codebook_size)
    originals = np.stack([ds[i]["image"] for i in range(min(GRID_IMAGES, n))])
    recons, _ = recon_fn(originals)
    pictures.save_reconstruction_grid(originals, np.asarray(recons),
                                   workdir.tokenizer / f"reconstructions_{split}.png")
    metrics = {f"{split}_{k}": float(v) for k, v in metrics.items()}
    metrics["codebook_size"] = model.codebook_size
    io.write_json_atomic(workdir.tokenizer / f"eval_{split}.json", metrics)
    return metrics
