"""The tokenize stage's encoder: this process's first device against all of its devices
(mmjax.stages.tokenize.local_encoder), on a finished demo's tokenizer and train images.

  python -m bench.tokenize_stage --base=DEMO_WORKDIR          # 2 CPU devices, as the demo
  python -m bench.tokenize_stage --base=DEMO_WORKDIR --images=16384 --rounds=3

Why: the stage encodes every image of the dataset once, and a jit without shardings runs on one
device; with mesh.cpu_devices (or the 8 accelerators of a host) the others sit idle. Both
encoders run in this process on the same batches of 128, alternating within each round;
reported: images/s and CPU seconds of each, and how many token indices differ between them
(float rounding may move a latent across an FSQ rounding boundary). Writes
bench/results/tokenize_stage.json.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags

from bench.common import load_config, write_results

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/mot_shapes.py:demo", "Config of the finished run.")
flags.DEFINE_string("base", None, "A workdir holding a finished data/ and tokenizer/.")
flags.DEFINE_integer("images", 4096, "Train images encoded per encoder per round.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
flags.DEFINE_integer("batch_size", 128, "Images per encoder call (the stage's batch).")
flags.mark_flag_as_required("base")


def main(_):
    config = load_config(FLAGS.config)
    from mmjax import parallel
    parallel.split_cpu_host(int(config.mesh.cpu_devices))
    import jax
    import numpy as np

    from mmjax.data import pipeline
    from mmjax.stages import tokenize as tokenize_stage
    from mmjax.stages import tokenizer as tokenizer_stage
    from mmjax.tokenizers import autoencoder as ae
    from mmjax.workdir import Workdir

    workdir = Workdir.from_config(config, FLAGS.base)
    model, params = tokenizer_stage.load_tokenizer(config, workdir)
    ds = pipeline.image_caption_dataset(config.data, "train", workdir.data_dir)
    n = min(FLAGS.images, len(ds))
    batches = [np.stack([ds[i]["image"] for i in range(lo, min(lo + FLAGS.batch_size, n))])
               for lo in range(0, n, FLAGS.batch_size)]
    first = jax.jit(lambda images: ae.tokenize(model, params, ae.images_to_float(images)))
    encoders = {"first_device": lambda images: np.asarray(first(images)),
                "all_local_devices": tokenize_stage.local_encoder(model, params)}
    tokens = {name: [encode(b) for b in batches[:2]] for name, encode in encoders.items()}  # compile
    runs = {name: [] for name in encoders}
    for _ in range(FLAGS.rounds):
        for name, encode in encoders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            tokens[name] = [encode(b) for b in batches]
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].append({"images_per_s": n / wall, "cpu_s": cpu})
            print(f"{name}: {n / wall:.0f} images/s, cpu {cpu:.1f} s", flush=True)
    a, b = (np.concatenate(tokens[k]) for k in encoders)
    mean = lambda name, key: sum(r[key] for r in runs[name]) / len(runs[name])  # noqa: E731
    results = {"config": FLAGS.config, "images": n, "rounds": FLAGS.rounds,
               "local_devices": jax.local_device_count(),
               "command": "python -m bench.tokenize_stage " + " ".join(sys.argv[1:]),
               "runs": runs,
               "images_per_s": {name: mean(name, "images_per_s") for name in encoders},
               "speedup_per_round": [r["images_per_s"] / f["images_per_s"] for f, r in
                                     zip(runs["first_device"], runs["all_local_devices"])],
               "indices_differing": int((a != b).sum()), "indices": int(a.size)}
    write_results("tokenize_stage", results)


if __name__ == "__main__":
    app.run(main)
