"""Import throughput (images/s per core) and tokenizer-stage training speed on imported JPEGs.

  python -m bench.import_images [--images 2000] [--steps 60]

1. Writes `--images` JPEGs (160x160 crops of scikit-learn's sample photos, captioned) as a
   `folder` source, imports them with one process (so images/s is per core) as they came and with
   `--resize=32`.
2. Trains the FSQ tokenizer (configs/fsq_shapes.py:smoke sizes, 32 px, batch 64) on the imported
   set with data.worker_count 0 and 2, and on the embedded shapes set: the tokenizer stage is
   where images are decoded every step (the model stage reads precomputed tokens). Steps/s is the
   trainer's own `steps_per_sec`, averaged over the logged windows after the first (compile).
Writes bench/results/import_images.json with the command and git commit.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import git_commit, load_config, window_rates, write_results  # noqa: E402


def write_source(root: str, n: int) -> None:
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % 2]
        top, left = rng.integers(0, photo.shape[0] - 160), rng.integers(0, photo.shape[1] - 160)
        sub = os.path.join(root, f"d{i // 500:03d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(photo[top:top + 160, left:left + 160]).save(os.path.join(sub, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(sub, f"{i:06d}.txt"), "w") as f:
            f.write(f"a crop of the {'temple' if i % 2 == 0 else 'flower'} photo at {top} {left}")


def time_import(source: str, data_dir: str, name: str, resize: int) -> dict:
    from mmjax.data import import_images as ii
    s = ii.Settings(format="folder", source=source, name=name, data_dir=data_dir, resize=resize,
                    splits=(("train", 0.9), ("validation", 0.05), ("test", 0.05)))
    t0 = time.perf_counter()
    report = ii.import_dataset(s)
    seconds = time.perf_counter() - t0
    return {"records": report["records"], "seconds": seconds, "resize": resize,
            "images_per_s_per_core": report["records"] / seconds}


def train_speed(work: str, data: dict, steps: int) -> dict:
    from mmjax import stages, train
    from mmjax.tasks.tokenizer import TokenizerTask
    from mmjax.workdir import Workdir
    config = load_config("configs/fsq_shapes.py:smoke")
    config.data.update(data)
    tc = config.tokenizer_train
    tc.steps, tc.batch_size, tc.log_every, tc.checkpoint_every = steps, 64, 10, steps
    tc.progress_bar = False
    wd = Workdir.from_config(config, work)
    stages.data.run(config, wd)  # builds shapes; checks an imported set is there
    train.train(config, wd, TokenizerTask(config, wd.data_dir))
    rates = window_rates(os.path.join(work, "tokenizer"))[1:]
    return {"steps_per_sec": float(np.mean(rates)), "windows": rates, **data}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, data_dir = os.path.join(tmp, "src"), os.path.join(tmp, "tfds")
        write_source(source, args.images)
        imports = [time_import(source, data_dir, "bench_jpegs", 0),
                   time_import(source, data_dir, "bench_jpegs32", 32)]
        training = []
        for label, data in (("shapes (embedded arrays)", {"name": "shapes", "num_train": 2048}),
                            ("imported JPEGs, worker_count 0", {"name": "bench_jpegs", "data_dir": data_dir, "worker_count": 0}),
                            ("imported JPEGs, worker_count 2", {"name": "bench_jpegs", "data_dir": data_dir, "worker_count": 2})):
            training.append({"what": label, **train_speed(os.path.join(tmp, f"w{len(training)}"), data, args.steps)})
            print(training[-1], flush=True)
    write_results("import_images", {
        "command": "python -m bench.import_images " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(), "import": imports, "tokenizer_training": training,
        "ratio_jpeg_w0_vs_shapes": training[1]["steps_per_sec"] / training[0]["steps_per_sec"],
        "ratio_jpeg_w2_vs_w0": training[2]["steps_per_sec"] / training[1]["steps_per_sec"]})


if __name__ == "__main__":
    main()
