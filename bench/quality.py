"""Quality against compute: text->image accuracy of the demo pipeline vs training FLOPs, per head.

  python -m bench.quality                                   # demo; model steps x0.25, x1, x4; both heads
  python -m bench.quality --multipliers=0.25,1 --heads=flow --spec=demo
  python -m bench.quality --base=/tmp/mmjax_demo --heads=flow  # the README demo's tokens

A user reads the curve to decide how long to train. The data, SentencePiece model, FSQ tokenizer
and image tokens are built once per tokenizer (`--spec`'s pipeline up to the tokenize stage, in a
fresh `<root>/<timestamp>/base_<head>`: the demo's flow head reads grid4 tokens, its discrete head
grid8 ones), or taken from `--base`; every point then copies them into its own fresh workdir and
runs the model stage for multiplier x the config's `train.steps` (warmup and checkpoints scaled
with it) and the sample stage (`sample.num_eval` test prompts, 512 in the demo). Nothing is resumed.

Training FLOPs of a point = the analytic FLOPs per real token the trainer reports MFU with
(`MultimodalTask.flops_per_token`: backbone, attention, heads at their targets, x3 for training)
x real (non-padding) tokens per step (mean over the first packed training rows) x steps.

Writes bench/results/quality.json (one row per point: head, steps, FLOPs, model-stage seconds,
whole-prompt / object / count accuracy with 95% Wilson intervals, caption exact accuracy, the
tokenizer's ceiling) and quality.png (whole-prompt accuracy vs training FLOPs, one curve per
head, intervals as error bars; caption accuracy beside it).
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags

from bench.common import git_commit, load_config, write_results
from mmjax import parallel

FLAGS = flags.FLAGS
flags.DEFINE_string("spec", "demo", "configs/mot_shapes.py argument of every point (the head is "
                    "set per point: 'discrete' is added for that head, and 'grid4' dropped).")
flags.DEFINE_list("multipliers", ["0.25", "1", "4"], "Model steps as multiples of the config's.")
flags.DEFINE_list("heads", ["flow", "discrete"], "Image heads: flow and/or discrete.")
flags.DEFINE_list("set", [], "Extra overrides of every point, FIELD=VALUE (e.g. train.lr=2e-3).")
flags.DEFINE_string("root", "/tmp/mmjax_bench_quality", "Parent of this invocation's fresh dir.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/quality.json).")
flags.DEFINE_string("base", None, "A finished workdir of the same --spec whose data, tokenizer and "
                    "image tokens every point copies (read only), instead of building them anew: "
                    "e.g. the README demo's workdir, so the curve shares its tokenizer.")

SHARED = ("data", "tokenizer", "image_tokens")  # what the base build leaves for every point
REPORTED = ("prompt_acc", "object_acc", "count_acc", "prompt_acc_1obj", "prompt_acc_2obj",
            "prompt_acc_3obj", "shape_acc", "color_acc")  # t2i_* (with _lo / _hi)


def point_config(head: str, multiplier: float):
    """`--spec` with `head`, `--set` overrides and multiplier x the model steps."""
    options = [o for o in FLAGS.spec.split(",") if o and o != "discrete"]
    if head == "discrete":  # a softmax over grid4's 2^24 codes is out of reach: it reads grid8
        options = [o for o in options if o != "grid4"]
    config = load_config("configs/mot_shapes.py:" + ",".join(
        options + (["discrete"] if head == "discrete" else [])))
    for item in FLAGS.set:
        field, _, value = item.partition("=")
        block, _, key = field.partition(".")
        if not key or key not in config[block]:
            raise app.UsageError(f"--set {item!r}: no config field {field!r}")
        current = config[block][key]
        config[block][key] = (value.lower() in ("1", "true") if isinstance(current, bool)
                              else type(current)(value))
    t = config.train
    base_steps = int(t.steps)
    t.steps = max(1, round(base_steps * multiplier))
    t.warmup_steps = min(int(t.warmup_steps), max(1, t.steps // 10))
    t.checkpoint_every = max(1, t.steps // 2)
    t.log_every = max(1, min(int(t.log_every), t.steps // 4))
    t.eval_every = 0
    t.progress_bar = False
    return config


def training_flops(config, workdir, steps: int) -> dict:
    """Analytic training FLOPs of `steps` steps: per real token x real tokens per step."""
    from mmjax.stages.common import text_tokenizer
    from mmjax.tasks.multimodal import FLOPS_SAMPLE_ROWS, MultimodalTask
    tokenizer = text_tokenizer(workdir)
    task = MultimodalTask(config, tokenizer.vocab_size, data=(workdir, tokenizer))
    ds = task.dataset("train", train=True)
    rows = [ds[i] for i in range(min(FLOPS_SAMPLE_ROWS, len(ds)))]
    real_per_row = float(np.mean([np.sum(r["segment_ids"] > 0) for r in rows]))
    per_step = real_per_row * int(config.train.batch_size)
    return {"flops_per_real_token": task.flops_per_token, "real_tokens_per_step": per_step,
            "train_flops": task.flops_per_token * per_step * steps}


def run_point(base: str, root: str, head: str, multiplier: float) -> dict:
    from mmjax import stages
    from mmjax.config_validation import validate
    from mmjax.workdir import Workdir
    config = point_config(head, multiplier)
    validate(config)
    path = os.path.join(root, f"{head}_x{multiplier:g}")
    os.makedirs(path)  # fresh: an existing one is an error
    for name in SHARED:
        shutil.copytree(os.path.join(base, name), os.path.join(path, name))
    wd = Workdir.from_config(config, path)
    t0 = time.perf_counter()
    trained = stages.run_mode(config, wd, "model")["model"]
    model_s = time.perf_counter() - t0
    scored = stages.run_mode(config, wd, "sample")["sample"]
    keep = [f"t2i_{k}{s}" for k in REPORTED for s in ("", "_lo", "_hi")]
    keep += [f"i2t_exact_acc{s}" for s in ("", "_lo", "_hi")] + ["recon_prompt_acc"]
    return {"head": head, "multiplier": multiplier, "steps": int(trained["step"]),
            "batch_size": int(config.train.batch_size), "model_stage_s": model_s,
            **training_flops(config, wd, int(trained["step"])),
            **{k: scored[k] for k in keep if k in scored},
            "val_t2i_image_loss": scored.get("val_t2i_image_loss"),
            "val_caption_ppl": scored.get("val_caption_ppl")}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (ax, key, title) in ((axes[0], "t2i_prompt_acc", "text->image whole prompt"),
                             (axes[1], "i2t_exact_acc", "image->caption exact")):
        for head, style in (("flow", "o-"), ("discrete", "s--")):
            rs = sorted((r for r in rows if r["head"] == head and key in r),
                        key=lambda r: r["train_flops"])
            if not rs:
                continue
            x = [r["train_flops"] for r in rs]
            y = np.array([100 * r[key] for r in rs])
            err = np.array([[100 * (r[key] - r[key + "_lo"]) for r in rs],
                            [100 * (r[key + "_hi"] - r[key]) for r in rs]])
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=f"{head} head")
            for r, xi, yi in zip(rs, x, y):
                ax.annotate(f"{r['steps']}", (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels collide in a decade
        ax.set_xlabel("training FLOPs (analytic, real tokens)")
        ax.set_ylabel(f"{title} accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend()
    for head, style in (("flow", ":"), ("discrete", "-.")):  # each head's tokenizer's ceiling
        ceiling = next((r["recon_prompt_acc"] for r in rows
                        if r["head"] == head and "recon_prompt_acc" in r), None)
        if ceiling is not None:
            axes[0].axhline(100 * ceiling, color="gray", ls=style, label=f"FSQ ceiling ({head})")
    axes[0].legend()
    fig.suptitle(f"configs/mot_shapes.py:{FLAGS.spec} at x{', x'.join(FLAGS.multipliers)} the "
                 "model steps (labels: steps; bars: 95% Wilson)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tokenizer_settings(head: str) -> str:
    """What a point's data, tokenizer and image tokens depend on (JSON): heads with the same
    settings share one base build; the demo's flow head (grid4) and discrete head (grid8) do not."""
    import json
    config = point_config(head, 1.0)
    return json.dumps({block: config[block].to_dict()
                       for block in ("data", "text", "fsq", "tokenizer_train") if block in config},
                      sort_keys=True, default=str)


def tokenizer_bases(root: str) -> dict[str, str]:
    """{head: workdir holding its data, tokenizer and image tokens}: `--base`, or one fresh
    build per distinct tokenizer_settings under root."""
    from mmjax import stages
    settings = {head: tokenizer_settings(head) for head in FLAGS.heads}
    if FLAGS.base:
        if len(set(settings.values())) > 1:
            raise app.UsageError(f"--base serves one tokenizer, but heads {FLAGS.heads} use "
                                 "different ones (e.g. grid4 and grid8): pass one --heads")
        missing = [n for n in SHARED if not os.path.isdir(os.path.join(FLAGS.base, n))]
        if missing:
            raise app.UsageError(f"--base {FLAGS.base}: no {', '.join(missing)} (run the "
                                 "pipeline there through --mode=tokenize first)")
        os.makedirs(root, exist_ok=False)
        return {head: FLAGS.base for head in FLAGS.heads}
    bases, built = {}, {}
    for head in FLAGS.heads:
        if settings[head] not in built:
            base = os.path.join(root, f"base_{head}")
            os.makedirs(base, exist_ok=False)
            config = point_config(head, 1.0)
            for mode in ("tokenizer", "tokenize"):  # data + SentencePiece + tokenizer, tokens
                stages.run_mode(config, base, mode)
            built[settings[head]] = base
        bases[head] = built[settings[head]]
    return bases


def main(_):
    bad = [h for h in FLAGS.heads if h not in ("flow", "discrete")]
    if bad:
        raise app.UsageError(f"--heads: {bad}; choose from flow, discrete")
    multipliers = [float(m) for m in FLAGS.multipliers]
    if any(m <= 0 for m in multipliers):
        raise app.UsageError(f"--multipliers must be > 0, got {FLAGS.multipliers}")
    # The stages run in this process: split the CPU host as `mmjax` would, before JAX starts.
    parallel.split_cpu_host(int(point_config(FLAGS.heads[0], 1.0).mesh.cpu_devices))
    root = os.path.join(FLAGS.root, time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.perf_counter()
    bases = tokenizer_bases(root)
    results = {"command": "python -m bench.quality " + " ".join(sys.argv[1:]),
               "git_commit": git_commit(), "root": root, "bases": bases, "spec": FLAGS.spec,
               "set": FLAGS.set, "base_s": time.perf_counter() - t0, "rows": []}
    for multiplier in sorted(multipliers):  # every head at a budget before the next budget:
        for head in FLAGS.heads:            # a cut-short study still has one curve per head
            row = run_point(bases[head], root, head, multiplier)
            results["rows"].append(row)
            print({k: row[k] for k in ("head", "steps", "train_flops", "model_stage_s",
                                       "t2i_prompt_acc", "i2t_exact_acc") if k in row},
                  flush=True)
            out = write_results("quality", results, FLAGS.out, quiet=True)
            plot(results["rows"], os.path.splitext(out)[0] + ".png")  # partial results survive
    write_results("quality", results, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
