"""The model stage: train the multimodal LM on packed text/image rows (image tokens must exist).

Every `train.eval_every` steps it also looks at the model being trained (`PeriodicSamples`):
text->image samples of the first test prompts above their true images, the FSQ reconstructions,
captions of test images, and (shapes) the rule checker's accuracies, into TensorBoard, so a curve
of text->image accuracy against step exists while the run goes on.
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from mmjax import api, multihost, train
from mmjax.data import image_tokens, pipeline
from mmjax.evals import recon, shapes_checker, text_metrics
from mmjax.stages.common import finished, text_tokenizer
from mmjax.tasks.multimodal import MultimodalTask, encode_caption

PERIODIC_PROMPTS = 16  # test prompts sampled at each train.eval_every (grids and accuracies)
GRID_COLUMNS = 8  # images per row of the TensorBoard grids


def build_task(config, workdir) -> MultimodalTask:
    """The trainer task, after checking its inputs exist (each missing one names its stage)."""
    for split in ("train", "validation"):  # the newest missing artifact is named first
        image_tokens.require_tokens(workdir, split)
    tokenizer = text_tokenizer(workdir)
    for split in ("train", "validation"):
        records = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
        image_tokens.load_tokens(workdir, split, len(records))
    return MultimodalTask(config, tokenizer.vocab_size, data=(workdir, tokenizer))


class PeriodicSamples:
    """observe(params, step) -> a MetricsWriter report of samples from the params in training."""

    def __init__(self, config, workdir, num: int = PERIODIC_PROMPTS):
        self.config, self.workdir = config, workdir
        records = pipeline.image_caption_dataset(config.data, "test", workdir.data_dir)
        tokens = image_tokens.load_tokens(workdir, "test", len(records))
        self.records = [records[i] for i in range(min(num, len(records)))]
        self.true_tokens = np.stack([tokens[i] for i in range(len(self.records))])
        self._run = None

    def __call__(self, params, step: int) -> dict:
        if jax.process_count() > 1:  # params are sharded across hosts: sample after training
            return {}
        host_params = jax.device_get(params)
        if self._run is None:
            self._run = api.Run(self.config, self.workdir, step=step, params=host_params)
        run = self._run
        run.params, run.step = host_params, step
        encoded = [encode_caption(run.tokenizer, r["caption"], run.max_caption_len, "truncate")
                   for r in self.records]
        ids = np.stack([e[0] for e in encoded])
        lengths = np.array([e[1] for e in encoded], np.int32)
        images = run.pixels(run.image_tokens_for(ids, lengths, seed=0))
        truth = np.stack([r["image"] for r in self.records])
        captions = run.captions_for_tokens(self.true_tokens, seed=1)
        scalars = {f"periodic_i2t_{k}": v for k, v in text_metrics.caption_scores(
            self.config.data.name, captions, self.records).items() if not k.endswith("_n")}
        if self.config.data.name == "shapes":
            attributes = np.stack([r["attributes"] for r in self.records])
            scores = shapes_checker.score_batch(images, attributes)
            scalars.update({f"periodic_t2i_{k}": v for k, v in scores.items()
                            if not k.endswith(("_n", "_lo", "_hi"))})
        lines = [f"{r['caption']}  ->  {c}" for r, c in zip(self.records, captions)]
        logging.info("step %d: periodic samples %s", step,
                     {k: round(v, 3) for k, v in scalars.items() if k.endswith("prompt_acc")})
        return {"scalars": scalars,
                "images": {"samples/text_to_image (top: true)": recon.make_grid(
                               truth, images, GRID_COLUMNS),
                           "samples/reconstruction (top: true)": recon.make_grid(
                               truth, run.pixels(self.true_tokens), GRID_COLUMNS)},
                "text": {"samples/image_to_caption": "\n\n".join(lines)}}


def run(config, workdir, **train_kwargs) -> dict:
    observe = PeriodicSamples(config, workdir) if int(config.train.eval_every) > 0 else None
    # Every process checks its inputs, and all stop together when one cannot see them.
    task = multihost.together("model stage inputs", lambda: build_task(config, workdir))
    summary = finished(train.train(config, workdir, task, observe=observe, **train_kwargs),
                       "model training")
    return {"step": summary["step"], **summary.get("validation", {})}
