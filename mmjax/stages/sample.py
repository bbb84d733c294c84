"""The sample stage (`--mode=sample`, alias `eval`): sample from a trained multimodal LM and score it.

On the TEST split (the first `sample.num_eval` records; the first `sample.num_samples` go into the
pictures) it runs, with the checkpoint in <workdir>/model/checkpoints:
- text -> image: images for the test captions (flow ODE or discrete head, CFG), decoded to pixels
  by the FSQ decoder. Shapes: scored by the exact rule checker (per attribute, per object, count,
  whole prompt). The same checker scores the FSQ reconstructions of the true images, the ceiling
  the tokenizer allows, and the true images themselves (1.0 unless the checker or data broke).
- image -> caption: captions of the test images given as their FSQ tokens (shapes: parsed back
  to attributes; digits: the digit named).
- validation losses (objectives.compute_losses on packed validation rows, one direction at a
  time): caption perplexity given the image (i2t rows, caption tokens and <eos> only) and the
  image loss given the caption (t2i rows; flow MSE, or CE and bits per code for the discrete head: its registry entry's val_metrics).
- the interleaved caption -> image -> caption chain of `sampling.interleaved` for a few prompts.
Writes <workdir>/samples/{eval.json, captions.txt, text_to_image.png, image_to_text.png,
interleaved.png}, prints a summary and returns the metrics.
"""
from __future__ import annotations

import logging
import math
import time

import jax
import numpy as np

from mmjax import api, checkpointing, config_validation, ema, io, objectives, pictures
from mmjax.data import image_tokens, packing, pipeline
from mmjax.errors import InputError
from mmjax.evals import fid, shapes_checker, text_metrics
from mmjax.tasks import multimodal as multimodal_task


# ---- the evaluations -------------------------------------------------------------------------
def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}


def validation_losses(config, workdir, tokenizer, model, params, special) -> dict:
    """Caption perplexity given images (i2t rows) and image loss given captions (t2i rows).

    Uses train.eval_batches batches of train.batch_size packed validation rows per direction.
    Token-weighted over batches. Names: val_caption_ppl / val_caption_nll (caption tokens and
    <eos> of i2t documents), val_t2i_image_loss (+ the head's `val_metrics`, e.g.
    val_t2i_bits_per_code for the discrete head).
    """
    objective = config_validation.objective_config(config.objective)

    def losses(p, batch):
        rng = jax.random.PRNGKey(int(config.sample.seed))
        return objectives.compute_losses(model, p, batch, rng, objective, train=False)[1]

    losses = jax.jit(losses)
    out = {}
    for direction, t2i_prob in (("i2t", 0.0), ("t2i", 1.0)):
        cfg = config.copy_and_resolve_references()
        cfg.objective.t2i_prob = t2i_prob
        ds = multimodal_task.packed_dataset(cfg, workdir, tokenizer, "validation", train=False)
        size = min(int(config.train.batch_size), len(ds))
        rows = min(len(ds), size * int(config.train.eval_batches)) // size * size
        sums = {}
        for start in range(0, rows, size):
            packed = [ds[i] for i in range(start, start + size)]
            batch = {k: np.stack([row[k] for row in packed]) for k in packing.PACKED_KEYS}
            if direction == "i2t":
                batch["text_mask"] = text_metrics.caption_only_mask(
                    batch["text_mask"], batch["text_targets"], (special.boi, special.eoi))
            m = jax.device_get(losses(params, batch))
            weight = float(m["text_tokens"] if direction == "i2t" else m["image_tokens"])
            key = "text_loss" if direction == "i2t" else "image_loss"
            sums[key] = sums.get(key, 0.0) + float(m[key]) * weight
            sums["weight"] = sums.get("weight", 0.0) + weight
        mean = sums.get("text_loss" if direction == "i2t" else "image_loss", 0.0) / max(
            sums.get("weight", 0.0), 1.0)
        if direction == "i2t":
            out.update(val_caption_nll=mean, val_caption_ppl=math.exp(mean))
        else:
            out["val_t2i_image_loss"] = mean
            out.update(model.cfg.head.val_metrics(mean))
    return out


def prompts_of(run_: api.Run, records) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [N, max_caption_len], lengths [N]) of the records' captions as the text->image
    prompts the eval feeds the sampler (data.long_captions "drop" cuts long prompts here)."""
    policy = multimodal_task.long_caption_policy(run_.config)
    encoded = [multimodal_task.encode_caption(run_.tokenizer, r["caption"], run_.max_caption_len,
                                              "truncate" if policy == "drop" else policy)
               for r in records]
    return np.stack([e[0] for e in encoded]), np.array([e[1] for e in encoded], np.int32)


def run(config, workdir) -> dict:
    """Samples, scores and writes <workdir>/samples/*; returns the metrics (see module doc)."""
    if config.data.name == "shapes_edits":  # A + instruction -> B, scored by edit rules
        from mmjax.stages import sample_edits
        return sample_edits.run(config, workdir)
    started = time.time()
    sc = config.sample
    checkpointing.require_directory(workdir.model_checkpoints)  # the first thing missing
    run_ = api.Run(config, workdir)  # what users load with mmjax.load: one code path
    tok = run_.tokenizer
    records = pipeline.image_caption_dataset(config.data, "test", workdir.data_dir)
    token_ds = image_tokens.load_tokens(workdir, "test", len(records))
    n_eval = min(len(records), max(int(sc.num_eval), int(sc.num_samples)))
    if n_eval < 1:
        raise InputError("the test split is empty: nothing to sample (data.num_test)")
    recs = [records[i] for i in range(n_eval)]
    true_tokens = np.stack([token_ds[i] for i in range(n_eval)]).astype(np.int32)
    ids, lengths = prompts_of(run_, recs)
    if run_.settings.max_text_len < run_.max_caption_len + 1:
        logging.warning("sample.max_text_len=%d < data.max_caption_len + 1 = %d: longer captions "
                        "(and their <eos>) are cut off, which caps the i2t accuracies.",
                        run_.settings.max_text_len, run_.max_caption_len + 1)
    seed = int(sc.seed)
    metrics: dict = {"step": int(run_.step), "num_eval": n_eval}

    t0 = time.time()
    images = run_.pixels(run_.image_tokens_for(ids, lengths, seed=seed))
    metrics["t2i_seconds"] = time.time() - t0  # wall time incl. compilation, like i2t_seconds
    recon = run_.pixels(true_tokens)
    truth = np.stack([r["image"] for r in recs])
    if config.data.name == "shapes":
        attributes = np.stack([r["attributes"] for r in recs])
        for prefix, scored in (("t2i", images), ("recon", recon), ("gt", truth)):
            metrics.update(_prefixed(prefix, shapes_checker.score_batch(scored, attributes)))

    metrics.update(fid.maybe_fid_kid(config.get("eval"), images, truth))  # {} + a log line when off

    t0 = time.time()
    captions = run_.captions_for_tokens(true_tokens, seed=seed + 1)
    metrics["i2t_seconds"] = time.time() - t0
    metrics.update(_prefixed("i2t", text_metrics.caption_scores(config.data.name, captions, recs)))
    metrics.update(validation_losses(config, workdir, tok, run_.model, run_.params,
                                     run_.special))

    chain = None
    rounds, n_show = int(sc.interleaved_rounds), min(int(sc.num_samples), n_eval)
    if rounds > 0 and n_show > 0:
        chain = jax.device_get(run_.sampler(run_.settings).interleaved(
            run_.params, ids[:n_show], lengths[:n_show], jax.random.PRNGKey(seed + 2),
            rounds=rounds))
    metrics["seconds"] = time.time() - started
    if jax.process_index() == 0:
        _write(workdir, config, metrics, recs[:n_show], images[:n_show], truth[:n_show], captions,
               recs, chain, tok, run_.pixels)
    _print_summary(metrics)
    return metrics


# ---- outputs ---------------------------------------------------------------------------------
def _write(workdir, config, metrics, shown, images, truth, captions, recs, chain, tok, to_pixels):
    out = workdir.samples
    pictures.save_titled_grid(images, [r["caption"] for r in shown], out / "text_to_image.png")
    pictures.save_titled_grid(truth, captions[:len(shown)], out / "image_to_text.png")
    lines = ["# image -> caption on the test split: index | true caption | generated caption"]
    lines += [f"{int(r['index'])} | {r['caption']} | {c}" for r, c in zip(recs, captions)]
    if chain is not None:  # row i: prompt -> image -> its caption -> image of that caption ...
        rounds = chain["indices"].shape[1]
        chain_images = to_pixels(chain["indices"].reshape(-1, chain["indices"].shape[-1]))
        said = [tok.decode(t) for t in chain["tokens"].reshape(-1, chain["tokens"].shape[-1])]
        texts = [[r["caption"]] + said[i * rounds:(i + 1) * rounds] for i, r in enumerate(shown)]
        pictures.save_titled_grid(chain_images, [t for row in texts for t in row[:rounds]],
                                  out / "interleaved.png", ncols=rounds)
        lines.append("# interleaved: prompt -> caption generated for its image -> caption of the "
                     "image of that caption ... (interleaved.png titles each image by its prompt)")
        lines += [" -> ".join(row) for row in texts]
    io.write_text_atomic(out / "captions.txt", "\n".join(lines) + "\n")
    record = {"metrics": metrics, "sample": config.sample.to_dict(),
              "params": ema.model_params_key(config),  # the weights scored: EMA or last iterate
              "dataset": config.data.name, "image_head": config.model.image_head}
    io.write_json_atomic(out / "eval.json", record)


def _print_summary(metrics: dict) -> None:
    keys = ("step", "t2i_prompt_acc", "t2i_object_acc", "recon_prompt_acc", "i2t_exact_acc",
            "i2t_object_acc", "i2t_digit_acc", "val_caption_ppl", "val_t2i_image_loss",
            "val_t2i_bits_per_code", "fid", "kid", "t2i_seconds", "i2t_seconds")
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
    logging.info("sample/eval: %s", shown)
    print(f"mmjax sample/eval: {shown}")
