"""FSQ against VQ (Mentzer et al. 2023, Fig. 3): codebook usage and PSNR vs codebook size.

  python -m bench.fsq_vs_vq            # 5 sizes x {fsq, vq}, 300 steps x 16 images each

Both quantizers sit on the same conv autoencoder (configs/fsq_shapes.py:demo widths) and train
on the embedded natural-image set (`data.name="natural"`: crops of scikit-learn's photos plus
digits) for the same steps and batch. FSQ uses the paper's recommended levels per size; VQ gets
a codebook of the same size and the same code width (len(levels)), with the baseline tricks:
EMA codebook (decay 0.99), commitment beta 0.25, dead codes reseeded from encoder outputs after
`--reseed` unused steps.

Every run trains from a FRESH workdir (`<root>/<timestamp>/<quantizer>_<size>`; an existing one
is an error), so `wall_s` is the cost of training + evaluating that run and nothing is resumed.
The dataset is built once into `<root>/<timestamp>/data` beforehand (timed apart, `data_s`).
Usage and perplexity are counted over validation crops only (held-out photo tiles, never seen in
training): a run with K codes evaluates max(--min_eval_images, 10 K / tokens per image) crops, so
tokens_counted >= 10 x K; the set holds enough crops for the largest K. Usage depends on how many
tokens are counted (a skewed code distribution shows its tail only over many tokens; the FSQ paper
counts ImageNet's validation set, >= 195 x K), so each row also reports `usage_at_multiples`:
usage over the first m x K validation tokens for m in --usage_multiples, and
`train_usage_at_multiples` on training crops (null where the train set holds fewer tokens), which
separates the quantizer from the held-out tiles' limited content.

Writes bench/results/fsq_vs_vq.json (rows + git commit + command) and fsq_vs_vq.png. A long sweep
can be split over invocations, run one after another or side by side: `--rows_from=A.json[,B.json]`
adds their rows to this one's table (same settings, checked before anything trains), and
`--quantizers= --rows_from=A.json,B.json` only joins them.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

from bench.common import git_commit, load_config, steady_rates, write_results
from mmjax.config_validation import image_side

FLAGS = flags.FLAGS
# The FSQ paper's recommended levels (Table 1) for ~2^8 .. 2^16 codes.
PAPER_LEVELS = {8: (8, 6, 5), 10: (8, 5, 5, 5), 12: (7, 5, 5, 5, 5), 14: (8, 8, 8, 6, 5),
                16: (8, 8, 8, 5, 5, 5)}
flags.DEFINE_list("log2_sizes", ["8", "10", "12", "14", "16"], "Codebook sizes as log2 (keys of "
                  "the FSQ paper's level table: 8, 10, 12, 14, 16).")
flags.DEFINE_list("quantizers", ["fsq", "vq"], "Quantizers to run.")
flags.DEFINE_integer("steps", 300, "Training steps per run.")
flags.DEFINE_integer("batch_size", 16, "Training batch size.")
flags.DEFINE_integer("image_size", 32, "Image side (pixels).")
flags.DEFINE_integer("num_train", 8192, "Natural train crops.")
flags.DEFINE_integer("usage_factor", 10, "Usage of a codebook of K codes is counted over >= this "
                     "x K validation tokens.")
flags.DEFINE_list("usage_multiples", ["10", "100"], "Also report usage over the first m x K "
                  "validation tokens (and train tokens, where the train set holds them) for each m: "
                  "usage grows with the tokens counted; the FSQ paper counts >= 195 x K.")
flags.DEFINE_integer("min_eval_images", 2048, "Validation crops evaluated per run at least.")
flags.DEFINE_integer("reseed", 100, "VQ: reseed a code unused for this many steps (0 = off).")
flags.DEFINE_float("ema_decay", 0.99, "VQ: codebook EMA decay (0 = learned by gradient).")
flags.DEFINE_integer("score_every", 0, "Also score usage / perplexity / PSNR at every this many "
                     "steps (checkpoints kept), for usage against training length; 0 = the end only.")
flags.DEFINE_integer("cpu_devices", 0, "mesh.cpu_devices of every run: >= 2 trains data-parallel over "
                     "the host's cores (a long run ~1.5x faster on 2 cores; the same math, other "
                     "float rounding); 0 = one device, as the committed 300- to 7200-step rows ran.")
flags.DEFINE_string("root", "/tmp/mmjax_bench_fsq_vs_vq", "Parent of this invocation's fresh dir.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/fsq_vs_vq.json).")
flags.DEFINE_list("rows_from", [], "JSONs of earlier invocations at the same settings whose rows "
                  "this one's output and plot include: a long sweep split over cores or machines "
                  "(e.g. --quantizers=fsq, then --quantizers=vq --rows_from=<first>; or parts run "
                  "side by side, joined by --quantizers= --rows_from=<a>,<b>, which trains nothing).")

# What must match for rows of two invocations to share a table: the data, the autoencoder and the
# VQ baseline's tricks (keys of the results), and each row's training budget.
SHARED_SETTINGS = ("data.image_size", "data.num_train", "data.token_grid", "data.usage_multiples",
                   "channels", "vq")


def base_config(num_validation: int, data_dir: str):
    config = load_config("configs/fsq_shapes.py:demo")
    config.data.name = "natural"
    config.data.image_size = FLAGS.image_size
    config.data.num_train = FLAGS.num_train
    config.data.num_validation = num_validation
    config.data.num_test = 64
    config.data.data_dir = data_dir
    tc = config.tokenizer_train
    tc.steps = FLAGS.steps
    tc.batch_size = FLAGS.batch_size
    tc.warmup_steps = min(100, FLAGS.steps // 10)
    tc.checkpoint_every = FLAGS.score_every or FLAGS.steps
    tc.keep_checkpoints = -(-FLAGS.steps // tc.checkpoint_every)
    tc.log_every = max(min(50, FLAGS.steps // 4), 1)
    tc.eval_every = 0
    tc.progress_bar = False
    config.mesh.cpu_devices = FLAGS.cpu_devices
    return config


def run_config(base, quantizer: str, levels: tuple[int, ...]):
    config = base.copy_and_resolve_references()
    config.fsq.levels = levels
    config.fsq.quantizer = quantizer
    if quantizer == "vq":
        config.fsq.vq_codebook_size = math.prod(levels)
        config.fsq.vq_dim = len(levels)
        config.fsq.vq_ema_decay = FLAGS.ema_decay
        config.fsq.vq_reseed = FLAGS.reseed if FLAGS.ema_decay > 0 else 0
    return config


def run_one(config, workdir: str, eval_images: int) -> dict:
    from mmjax import train
    from mmjax.config_validation import validate
    from mmjax import stages
    from mmjax.stages.tokenizer import evaluate as evaluate_tokenizer, load_tokenizer
    from mmjax.tasks.tokenizer import TokenizerTask
    from mmjax.workdir import Workdir
    if os.path.exists(workdir):
        raise FileExistsError(f"{workdir} exists; every run must start from a fresh workdir")
    validate(config)
    start = time.perf_counter()
    wd = Workdir.from_config(config, workdir)
    stages.data.run(config, wd)  # the data is built once beforehand; this only checks it
    summary = train.train(config, wd, TokenizerTask(config, wd.data_dir))
    train_s = time.perf_counter() - start
    loaded = load_tokenizer(config, wd)
    metrics = evaluate_tokenizer(config, wd, "validation", max_images=eval_images, loaded=loaded)
    usage_at = {split: usage_at_multiples(config, wd, split, loaded)
                for split in ("validation", "train")}
    wall = time.perf_counter() - start
    scored_steps = range(FLAGS.score_every, FLAGS.steps, FLAGS.score_every) if FLAGS.score_every else ()
    curve = [score_checkpoint(config, wd, step, eval_images)
             for step in scored_steps] + [{"step": int(summary["step"]),
                                      "usage": metrics["validation_usage"],
                                      "perplexity": metrics["validation_perplexity"],
                                      "psnr": metrics["validation_psnr"]}]
    steady = steady_rates(os.path.join(workdir, "tokenizer"))
    grid = image_side(config)
    return {"quantizer": config.fsq.quantizer, "codebook_size": int(metrics["codebook_size"]),
            "levels": list(config.fsq.levels) if config.fsq.quantizer == "fsq" else None,
            "code_dim": len(config.fsq.levels),
            "usage": metrics["validation_usage"], "perplexity": metrics["validation_perplexity"],
            "psnr": metrics["validation_psnr"],
            "tokens_counted": eval_images * grid * grid, "eval_images": eval_images,
            "usage_at_multiples": usage_at["validation"],
            "train_usage_at_multiples": usage_at["train"],
            "steps": int(summary["step"]), "batch_size": int(config.tokenizer_train.batch_size),
            "final_train_loss": summary["train"].get("loss"),
            "steps_per_sec": sum(steady) / len(steady), "train_s": train_s, "wall_s": wall,
            **({"curve": curve} if FLAGS.score_every else {})}


def usage_at_multiples(config, wd, split: str, loaded) -> dict[str, float | None]:
    """{m: usage over the split's first m x K tokens} for m in --usage_multiples (None where the
    split holds fewer tokens), from the trained tokenizer `loaded` = (model, params): usage
    against the tokens counted."""
    import numpy as np
    from mmjax.data import pipeline
    from mmjax.evals import recon
    from mmjax.tokenizers import autoencoder as ae
    model, params = loaded
    recon_fn = ae.make_recon_fn(model, params)
    ds = pipeline.image_caption_dataset(config.data, split, wd.data_dir)
    grid = image_side(config)
    k = model.codebook_size
    multiples = sorted(int(m) for m in FLAGS.usage_multiples)
    fits = [m for m in multiples if m * k <= len(ds) * grid * grid]
    out = {str(m): None for m in multiples}
    if fits:
        n = -(-fits[-1] * k // (grid * grid))
        batches = (np.asarray(recon_fn(np.stack([ds[i]["image"] for i in range(s, min(s + 256, n))]))[1])
                   for s in range(0, n, 256))
        usage = recon.usage_by_token_count(batches, k, [m * k for m in fits])
        out.update({str(m): usage[m * k] for m in fits})
    return out


def score_checkpoint(config, wd, step: int, eval_images: int) -> dict:
    """Usage, perplexity and PSNR of the tokenizer checkpoint at `step`, on the same validation
    crops as the final score (stages.tokenizer.evaluate's first `eval_images`)."""
    import jax
    import numpy as np
    from flax import linen as nn
    from mmjax import checkpointing
    from mmjax.data import pipeline
    from mmjax.evals import recon
    from mmjax.tokenizers import autoencoder as ae
    model = ae.autoencoder_from_config(config)
    abstract = jax.eval_shape(lambda: nn.unbox(ae.init_variables(
        model, jax.random.PRNGKey(0), config.data.image_size)))
    directory = str(wd.tokenizer_checkpoints)
    if "vq" in abstract:  # EMA VQ: the codebook is the trainer's model state
        _, items = checkpointing.restore_state_items(
            directory, {"params": abstract["params"], "model_state": abstract["vq"]}, step)
        params = {"params": items["params"], "vq": items["model_state"]}
    else:
        _, params = checkpointing.restore_params(directory, abstract["params"], step=step)
    ds = pipeline.image_caption_dataset(config.data, "validation", wd.data_dir)
    batches = (np.stack([ds[i]["image"] for i in range(s, min(s + 64, eval_images))])
               for s in range(0, eval_images, 64))
    m = recon.evaluate_autoencoder(ae.make_recon_fn(model, params), batches, model.codebook_size)
    return {"step": step, "usage": m["usage"], "perplexity": m["perplexity"], "psnr": m["psnr"]}



def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_u, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    for q, style in (("fsq", "o-"), ("vq", "s--")):
        rs = sorted((r for r in rows if r["quantizer"] == q), key=lambda r: r["codebook_size"])
        if not rs:
            continue
        ks = [r["codebook_size"] for r in rs]
        multiples = sorted({m for r in rs for m in r.get("usage_at_multiples", {})}, key=int)[-3:]
        shades = (0.35, 0.65, 1.0)[-len(multiples):] if multiples else ()
        for shade, m in zip(shades, multiples):  # the most tokens counted drawn darkest
            at = [(k, r["usage_at_multiples"].get(m)) for k, r in zip(ks, rs)]
            at = [(k, u) for k, u in at if u is not None]
            ax_u.plot([k for k, _ in at], [100 * u for _, u in at], style, alpha=shade,
                      label=f"{q.upper()}, {m}x K tokens")
        if not multiples:
            ax_u.plot(ks, [100 * r["usage"] for r in rs], style, label=q.upper())
        ax_p.plot(ks, [r["psnr"] for r in rs], style, label=q.upper())
    for ax, label in ((ax_u, "codebook usage (%)"), (ax_p, "validation PSNR (dB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_u.set_ylim(0, 105)
    fig.suptitle("FSQ vs VQ on natural crops (held-out validation tiles)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def include_rows(results: dict, earlier: dict, path: str, planned: set, steps: int,
                 batch_size: int) -> None:
    """Adds the rows of `earlier` (an invocation's JSON, read from `path`) to `results`, refusing,
    before anything trains, with one line naming the file and the field where the two are run
    differently, or a (quantizer, log2 size) already `planned` (to run, or from another file):
    rows share a table only at the same data, autoencoder and budget. Adds its rows to
    `planned`."""
    def get(tree, dotted):
        for key in dotted.split("."):
            tree = tree.get(key) if isinstance(tree, dict) else None
        return tree

    for field in SHARED_SETTINGS:
        if get(earlier, field) != get(results, field):
            raise ValueError(f"--rows_from={path}: {field} is {get(earlier, field)!r} there, "
                             f"{get(results, field)!r} here")
    for row in earlier.get("rows", []):
        name = f"{row.get('quantizer')} 2^{row.get('log2_size')}"
        for field, want in (("steps", steps), ("batch_size", batch_size)):
            if row.get(field) != want:
                raise ValueError(f"--rows_from={path}: row {name} has {field}={row.get(field)!r}, "
                                 f"this run {want}")
        if (row.get("quantizer"), row.get("log2_size")) in planned:
            raise ValueError(f"--rows_from={path}: holds {name} already; run only what it lacks")
        planned.add((row.get("quantizer"), row.get("log2_size")))
    results["rows"] = results["rows"] + list(earlier.get("rows", []))
    results.setdefault("rows_from", []).append(
        {"file": os.path.basename(path), "command": earlier.get("command"),
         "git_commit": earlier.get("git_commit"), "rows_from": earlier.get("rows_from", [])})


def main(_):
    sizes = [int(s) for s in FLAGS.log2_sizes]
    bad = [s for s in sizes if s not in PAPER_LEVELS]
    if bad:
        raise app.UsageError(f"--log2_sizes: {bad} not in the FSQ paper's table {sorted(PAPER_LEVELS)}")
    bad = [q for q in FLAGS.quantizers if q not in ("fsq", "vq")]
    if bad:
        raise app.UsageError(f"--quantizers: {bad}; choose from fsq, vq")
    from mmjax import parallel
    parallel.split_cpu_host(FLAGS.cpu_devices)  # before anything starts JAX's backends
    root = os.path.join(FLAGS.root, time.strftime("%Y%m%d-%H%M%S"))
    largest = max(math.prod(PAPER_LEVELS[s]) for s in sizes)
    base = base_config(64, os.path.join(root, "data"))
    grid = image_side(base)
    top_multiple = max([FLAGS.usage_factor] + [int(m) for m in FLAGS.usage_multiples])
    num_validation = -(-top_multiple * largest // (grid * grid))
    base.data.num_validation = num_validation
    command = "python -m bench.fsq_vs_vq " + " ".join(sys.argv[1:])
    results = {"command": command.strip(), "git_commit": git_commit(), "root": root,
               "data": {"name": "natural", "image_size": base.data.image_size,
                        "num_train": base.data.num_train, "num_validation": num_validation,
                        "token_grid": [grid, grid], "usage_counted_on": "validation",
                        "usage_multiples": [int(m) for m in FLAGS.usage_multiples]},
               "vq": {"ema_decay": FLAGS.ema_decay, "beta": float(base.fsq.vq_beta),
                      "reseed": FLAGS.reseed, "code_dim": "len(levels) of the FSQ run"},
               "channels": list(base.fsq.channels), "cpu_devices": FLAGS.cpu_devices, "rows": []}
    planned = {(q, s) for s in sizes for q in FLAGS.quantizers}
    for path in FLAGS.rows_from:
        with open(path) as f:
            include_rows(results, json.load(f), path, planned, FLAGS.steps, FLAGS.batch_size)
    if not FLAGS.quantizers:  # only joins earlier parts
        if not FLAGS.rows_from:
            raise app.UsageError("--quantizers= (nothing to train) needs --rows_from")
        out = write_results("fsq_vs_vq", results, FLAGS.out)
        plot(results["rows"], os.path.splitext(out)[0] + ".png")
        return
    os.makedirs(root, exist_ok=False)
    from mmjax.data import pipeline
    t0 = time.perf_counter()
    pipeline.build_dataset(base.data, base.data.data_dir)
    results["data"]["data_s"] = time.perf_counter() - t0
    for size in sizes:
        for q in FLAGS.quantizers:
            config = run_config(base, q, PAPER_LEVELS[size])
            k = math.prod(PAPER_LEVELS[size])
            eval_images = min(num_validation,
                              max(FLAGS.min_eval_images, -(-FLAGS.usage_factor * k // (grid * grid))))
            row = run_one(config, os.path.join(root, f"{q}_{size}"), eval_images)
            row["log2_size"] = size
            results["rows"].append(row)
            print(row, flush=True)
            out = write_results("fsq_vs_vq", results, FLAGS.out, quiet=True)
            plot(results["rows"], os.path.splitext(out)[0] + ".png")  # partial results survive
    write_results("fsq_vs_vq", results, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
