"""The sample stage for edit data (data.name="shapes_edits"): generate B from (A, instruction).

For the first `sample.num_eval` chains of the TEST split, the model gets the chain's first image A
(its FSQ tokens, as a context image) and the first instruction, samples B in the edit layout
(`sampling.edit_image`, CFG over `<uncond>` instructions) and the FSQ decoder turns it into
pixels. mmjax.evals.edits scores it with the shapes rule checker: `edit_acc` (exactly the named
change) and `preserve_acc` (untouched objects intact), with Wilson 95% intervals. The same
scores of the FSQ reconstruction of the true B (`recon_*`: the tokenizer's ceiling), of the true
B (`gt_*`: 1.0 unless the checker or data broke) and of A itself (`copy_*`: the do-nothing
baseline, which preserves everything and edits nothing) put the model's numbers in context.
`val_edit_image_loss`: the image loss on validation documents `A instr B` (teacher forced).
Writes <workdir>/samples/{eval.json, edits.png (per prompt: A, generated B, true B)}.
"""
from __future__ import annotations

import logging
import time

import jax
import numpy as np

from mmjax import api, checkpointing, config_validation, io, objectives, pictures
from mmjax.data import image_tokens, packing, pipeline
from mmjax.data.shapes_edits import CHAIN_IMAGES
from mmjax.errors import InputError
from mmjax.evals import edits as edit_eval
from mmjax.tasks import edits as edits_task
from mmjax.tasks.multimodal import encode_caption


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {(f"{prefix}_{k}" if prefix else k): float(v) for k, v in metrics.items()}


def validation_edit_loss(config, workdir, run_) -> dict:
    """Image loss (token-weighted) on train.eval_batches batches of validation `A instr B` rows."""
    objective = config_validation.objective_config(config.objective)
    ds = edits_task.packed_dataset(config, workdir, run_.tokenizer, "validation", train=False,
                                   window=(0, 1))
    size = min(int(config.train.batch_size), len(ds))
    rows = min(len(ds), size * int(config.train.eval_batches)) // size * size
    losses = jax.jit(lambda p, b: objectives.compute_losses(
        run_.model, p, b, jax.random.PRNGKey(int(config.sample.seed)), objective, train=False)[1])
    total = weight = 0.0
    for start in range(0, rows, size):
        packed = [ds[i] for i in range(start, start + size)]
        m = jax.device_get(losses(run_.params, {k: np.stack([r[k] for r in packed])
                                                for k in packing.PACKED_KEYS}))
        total += float(m["image_loss"]) * float(m["image_tokens"])
        weight += float(m["image_tokens"])
    return {"val_edit_image_loss": total / max(weight, 1.0)}


def run(config, workdir) -> dict:
    """Samples, scores and writes <workdir>/samples/*; returns the metrics (module doc)."""
    started = time.time()
    sc = config.sample
    checkpointing.require_directory(workdir.model_checkpoints)
    run_ = api.Run(config, workdir)
    records = pipeline.image_caption_dataset(config.data, "test", workdir.data_dir)
    tokens = image_tokens.load_tokens(workdir, "test", len(records))
    n_eval = min(len(records) // CHAIN_IMAGES, max(int(sc.num_eval), int(sc.num_samples)))
    if n_eval < 1:
        raise InputError("the test split holds no edit chain: nothing to sample (data.num_test)")
    firsts = [records[c * CHAIN_IMAGES] for c in range(n_eval)]
    seconds = [records[c * CHAIN_IMAGES + 1] for c in range(n_eval)]
    a_tokens = np.stack([tokens[c * CHAIN_IMAGES] for c in range(n_eval)]).astype(np.int32)
    b_tokens = np.stack([tokens[c * CHAIN_IMAGES + 1] for c in range(n_eval)]).astype(np.int32)
    instructions = [r["caption"] for r in seconds]
    encoded = [encode_caption(run_.tokenizer, t, run_.max_caption_len, "error") for t in instructions]
    ids = np.stack([e[0] for e in encoded])
    lengths = np.array([e[1] for e in encoded], np.int32)
    seed = int(sc.seed)
    metrics: dict = {"step": int(run_.step), "num_eval": n_eval}

    t0 = time.time()
    sampler = run_.sampler(run_.settings)
    out = run_.map_batches(lambda c, i, n, k: sampler.edit(run_.params, c, i, n, k),
                           [run_.fsq.indices_to_codes(a_tokens), ids, lengths], seed)
    images = run_.pixels(out["indices"])
    metrics["edit_seconds"] = time.time() - t0  # wall time incl. compilation
    before = np.stack([r["attributes"] for r in firsts])
    after = np.stack([r["attributes"] for r in seconds])
    truth = np.stack([r["image"] for r in seconds])
    context = np.stack([r["image"] for r in firsts])
    for prefix, scored in (("", images), ("recon", run_.pixels(b_tokens)), ("gt", truth),
                           ("copy", context)):
        metrics.update(_prefixed(prefix, edit_eval.score_edits(scored, before, after, instructions)))
    metrics.update(validation_edit_loss(config, workdir, run_))
    metrics["seconds"] = time.time() - started
    if jax.process_index() == 0:
        n_show = min(int(sc.num_samples), n_eval)
        grid = np.stack([x for i in range(n_show) for x in (context[i], images[i], truth[i])])
        titles = [t for i in range(n_show) for t in ("A: " + firsts[i]["caption"],
                                                      "model: " + instructions[i], "true B")]
        pictures.save_titled_grid(grid, titles, workdir.samples / "edits.png", ncols=3)
        io.write_json_atomic(workdir.samples / "eval.json", {
            "metrics": metrics, "sample": config.sample.to_dict(), "dataset": config.data.name,
            "image_head": config.model.image_head})
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in (
        "step", "edit_acc", "edit_acc_lo", "edit_acc_hi", "preserve_acc", "preserve_acc_lo",
        "preserve_acc_hi", "recon_edit_acc", "gt_edit_acc", "copy_edit_acc", "val_edit_image_loss")
        if k in metrics)
    logging.info("sample/eval (edits): %s", shown)
    print(f"mmjax sample/eval (edits): {shown}")
    return metrics
