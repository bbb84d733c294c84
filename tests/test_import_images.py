"""mmjax.data.import_images on real JPEG/PNG files written by the tests, in every source format:
records and splits, bad records skipped with their file names or fatal with exit 2, duplicates
kept once, resumption after kill -9 and sharded processes giving the same dataset, no overwrite
without --overwrite; then the pipeline reads the set and a smoke training run uses it."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax.data import import_images as ii
from mmjax.data import pipeline
from mmjax import config_defaults

sys.path.insert(0, os.path.dirname(__file__))
import import_fixtures as fx  # noqa: E402
from child_env import child_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 12
SPLITS = (("train", 0.6), ("validation", 0.2), ("test", 0.2))
# format -> (writer, records expected, bad expected, duplicates expected)
FORMATS = {
    "folder": (lambda root: (fx.write_folder(root, N), root)[1], N, 2, 0),
    "jsonl": (lambda root: fx.write_jsonl(root, N), N + 1, 4, 1),
    "csv": (lambda root: fx.write_csv(root, N), N + 1, 3, 1),
    "webdataset": (lambda root: fx.write_webdataset(root, N), N, 3, 0),
    "parquet": (lambda root: fx.write_parquet(root, N), N, 1, 1),
    "hf_disk": (lambda root: fx.write_hf_disk(root, N), N, 1, 1),
}


def _env():
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    return env


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mmjax.data.import_images", *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _settings(fmt, source, data_dir, **kw):
    base = dict(format=fmt, source=source, name=f"my_{fmt}", data_dir=str(data_dir), splits=SPLITS,
                max_caption_words=20, unit_size=5)
    return ii.Settings(**(base | kw))


def _data_cfg(name, data_dir):
    d = config_defaults.data_config()
    d.name, d.data_dir = name, str(data_dir)
    return d


def _all_records(name, data_dir):
    out = {}
    for split, _ in SPLITS:
        try:
            ds = pipeline.image_caption_dataset(_data_cfg(name, data_dir), split, data_dir)
        except ValueError:  # a split that got no record
            continue
        out[split] = [ds[i] for i in range(len(ds))]
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_imports_and_loads(fmt, tmp_path):
    writer, n_good, n_bad, n_dup = FORMATS[fmt]
    root = tmp_path / "src"
    root.mkdir()
    source = writer(str(root))
    report = ii.import_dataset(_settings(fmt, source, tmp_path / "tfds"))
    assert (report["records"], report["bad"], report["duplicates"]) == (n_good, n_bad, n_dup)
    assert report["truncated"] == 1  # the over-long caption, cut at 20 words
    assert len(report["bad_examples"]) == min(n_bad, 5) and all(":" in b for b in report["bad_examples"])
    records = _all_records(f"my_{fmt}", tmp_path / "tfds")
    flat = [r for rs in records.values() for r in rs]
    assert len(flat) == n_good
    for r in flat:
        assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
        assert r["image"].std() > 1  # real pictures, decoded
        assert 0 < len(r["caption"].split()) <= 20
        assert (r["attributes"] == -1).all() and r["label"] == -1
    assert fx.LONG_CAPTION.startswith(next(r["caption"] for r in flat if "very long" in r["caption"]))
    # the same picture with a second caption (jsonl/csv) lands in the same split as the first
    if fmt in ("jsonl", "csv"):
        split_of = {r["caption"]: s for s, rs in records.items() for r in rs}
        assert split_of["a second caption of the first image"] == split_of["a photo of a chinese temple number 0"]
    report_file = tmp_path / "tfds" / f"my_{fmt}" / ii.VERSION / "import_report.json"
    assert json.loads(report_file.read_text())["records"] == n_good
    assert not (tmp_path / "tfds" / f"my_{fmt}" / f"_import_{ii.VERSION}").exists()


def test_stored_bytes_are_the_source_files(tmp_path):
    fx.write_folder(str(tmp_path / "src"), 4)
    ii.import_dataset(_settings("folder", str(tmp_path / "src"), tmp_path / "tfds",
                                splits=(("train", 1.0),)))
    import tensorflow_datasets as tfds
    source = tfds.builder("my_folder", data_dir=str(tmp_path / "tfds")).as_data_source("train")
    for i in range(len(source)):
        raw = source[i]
        key = raw["key"].decode()
        ext = "jpg" if os.path.exists(tmp_path / "src" / f"{key}.jpg") else "png"
        assert raw["image"] == (tmp_path / "src" / f"{key}.{ext}").read_bytes()


def test_resize_pre_resizes(tmp_path):
    fx.write_folder(str(tmp_path / "src"), 4)
    ii.import_dataset(_settings("folder", str(tmp_path / "src"), tmp_path / "tfds", resize=16,
                                splits=(("train", 1.0),)))
    import io
    import tensorflow_datasets as tfds
    from PIL import Image
    source = tfds.builder("my_folder", data_dir=str(tmp_path / "tfds")).as_data_source("train")
    assert {Image.open(io.BytesIO(source[i]["image"])).size for i in range(len(source))} == {(16, 16)}


def test_splits_are_deterministic_by_key():
    keys = [f"img{i}" for i in range(2000)]
    a = [ii.split_of(k, SPLITS) for k in keys]
    assert a == [ii.split_of(k, SPLITS) for k in keys]
    assert abs(a.count("train") / len(a) - 0.6) < 0.05  # the fractions are honoured
    assert ii.parse_splits("train:0.98,validation:0.01,test:0.01")[0] == ("train", 0.98)
    for bad in ("train:0.5", "train:x", "train:0.5,train:0.5", "Train:1", "train:nan,validation:1",
                "train:1", "train:0.5,valid:0.3,test:0.2", "train:1,validation:0,test:0"):
        with pytest.raises(ValueError, match="--splits"):
            ii.parse_splits(bad)


def test_long_caption_policies():
    assert ii.limit_caption("a b c d", 2, "truncate") == ("a b", True)
    assert ii.limit_caption("a b c d", 2, "drop") == (None, True)
    assert ii.limit_caption("a b", 2, "error") == ("a b", False)
    with pytest.raises(ValueError, match="--max_caption_words=2"):
        ii.limit_caption("a b c", 2, "error")
    with pytest.raises(ValueError, match="UTF-8"):
        ii.clean_caption("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="empty"):
        ii.clean_caption(" \n ")


def test_on_error_exits_2_naming_the_file_and_leaves_nothing_complete(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    source = fx.write_jsonl(str(root), 4)
    proc = _cli("--format=jsonl", f"--source={source}", "--name=strict", f"--data_dir={tmp_path}/tfds",
                "--on_error=error")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("import_images: error: data.jsonl:") and "broken.jpg" in err
    assert not (tmp_path / "tfds" / "strict" / ii.VERSION).exists()
    proc = _cli("--format=jsonl", f"--source={source}", "--name=strict2", f"--data_dir={tmp_path}/tfds",
                "--long_captions=error", "--max_caption_words=10")
    assert proc.returncode == 2 and "data.jsonl:2" in proc.stderr and "words" in proc.stderr


def test_never_overwrites_without_flag(tmp_path):
    fx.write_folder(str(tmp_path / "src"), 4)
    args = ["--format=folder", f"--source={tmp_path}/src", "--name=mine", f"--data_dir={tmp_path}/tfds"]
    assert _cli(*args).returncode == 0
    info = tmp_path / "tfds" / "mine" / ii.VERSION / "dataset_info.json"
    before = info.read_text()
    proc = _cli(*args)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert info.read_text() == before
    proc = _cli(*args, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]


def _dataset_rows(name, data_dir):
    import tensorflow_datasets as tfds
    b = tfds.builder(name, data_dir=str(data_dir))
    return {s: [(r["key"], r["caption"], r["image"]) for r in b.as_data_source(s)] for s in b.info.splits}


def test_sharded_processes_and_kill9_resume_give_the_same_dataset(tmp_path):
    fx.write_folder(str(tmp_path / "src"), N)
    one = _settings("folder", str(tmp_path / "src"), tmp_path / "one", name="mine", unit_size=2)
    ii.import_dataset(one)
    expected = _dataset_rows("mine", tmp_path / "one")
    # three processes, then the final step
    for p in range(3):
        ii.import_dataset(one.__class__(**(ii.dataclasses.asdict(one) | dict(
            data_dir=str(tmp_path / "three"), process_index=p, process_count=3,
            splits=SPLITS))))
        if p == 0:  # the final step refuses while a process has not finished
            with pytest.raises(ValueError, match="process 1 of 3 has not finished"):
                ii.finalize(ii.Settings(**(ii.dataclasses.asdict(one) | dict(
                    data_dir=str(tmp_path / "three"), process_count=3, splits=SPLITS))))
    ii.finalize(ii.Settings(**(ii.dataclasses.asdict(one) | dict(
        data_dir=str(tmp_path / "three"), process_count=3, splits=SPLITS))))
    assert _dataset_rows("mine", tmp_path / "three") == expected
    # kill -9 in the middle of an import (slowed down per unit), then the same command again
    args = ["--format=folder", f"--source={tmp_path}/src", "--name=mine", f"--data_dir={tmp_path}/killed",
            "--splits=train:0.6,validation:0.2,test:0.2", "--max_caption_words=20", "--unit_size=2"]
    slow = ("import sys, time; from mmjax.data import import_images as ii; orig = ii.import_unit\n"
            "def slow(*a, **k):\n    time.sleep(0.7)\n    return orig(*a, **k)\n"
            "ii.import_unit = slow; ii._define_flags(); from absl import app\n"
            "sys.argv = ['import_images'] + sys.argv[1:]; app.run(ii._main)\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "killed" / "mine" / f"_import_{ii.VERSION}" / "parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("*.done.json")) if parts.exists() else []) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "mine" / ii.VERSION).exists()
    done_before = len(list(parts.glob("*.done.json")))
    assert 2 <= done_before < 7  # 14 images -> 7 units: it really stopped half-way
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _dataset_rows("mine", tmp_path / "killed") == expected


def test_bad_flags_are_one_line(tmp_path):
    proc = _cli("--format=folder", f"--source={tmp_path}/none", "--name=x", f"--data_dir={tmp_path}")
    assert proc.returncode == 2 and "is not a directory" in proc.stderr.strip().splitlines()[-1]
    proc = _cli("--format=parquet", f"--source={tmp_path}/*.parquet", "--name=Bad-Name", f"--data_dir={tmp_path}")
    assert proc.returncode == 2 and "--name='Bad-Name'" in proc.stderr
    for change, says in ((dict(name="natural"), "embedded dataset's name"),
                         (dict(resize=3), "--resize=3: 0 .* or at least 8 pixels")):
        with pytest.raises(ValueError, match=says):
            ii.import_dataset(_settings("folder", str(tmp_path), tmp_path / "tfds", **change))


def test_a_mistyped_source_does_not_block_the_corrected_rerun(tmp_path):
    """The source is read before the staging dir exists: a typo leaves no interrupted import
    whose settings the corrected command would have to match."""
    fx.write_folder(str(tmp_path / "photos"), 4)
    typo = _settings("folder", str(tmp_path / "phtos"), tmp_path / "tfds", name="mine")
    with pytest.raises(ValueError, match="is not a directory"):
        ii.import_dataset(typo)
    assert not os.path.exists(ii.staging_dir(typo))
    summary = ii.import_dataset(_settings("folder", str(tmp_path / "photos"), tmp_path / "tfds",
                                          name="mine"))
    assert sum(summary["splits"].values()) == 4
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no \.jpg / \.jpeg / \.png / \.webp file under it"):
        ii.import_dataset(_settings("folder", str(tmp_path / "empty"), tmp_path / "tfds",
                                    name="nothing"))


def test_missing_parquet_column_names_the_file(tmp_path):
    fx.write_parquet(str(tmp_path), 4)
    proc = _cli("--format=parquet", f"--source={tmp_path}/part-*.parquet", "--name=p",
                f"--data_dir={tmp_path}/tfds", "--caption_key=text", "--on_error=error")
    assert proc.returncode == 2 and "part-0.parquet" in proc.stderr and "'text'" in proc.stderr


SMOKE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from bench.common import load_config
from mmjax import main
config = load_config("configs/mot_shapes.py:smoke")
config.data.name, config.data.data_dir = "my_photos", sys.argv[2]
config.data.max_caption_len = 6  # the photo captions are longer: truncated (data.long_captions)
config.sample.num_eval, config.sample.num_samples, config.sample.batch_size = 4, 2, 2
config.sample.interleaved_rounds = 0
config.tokenizer_train.batch_size = config.train.batch_size = 4
results = main.run(config, sys.argv[1], "pipeline")
with open(sys.argv[1] + "/results.json", "w") as f:
    json.dump(results["sample"], f)
"""


def test_smoke_training_on_an_imported_set(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    source = fx.write_jsonl(str(root), 24)
    ii.import_dataset(ii.Settings(format="jsonl", source=source, name="my_photos",
                                  data_dir=str(tmp_path / "tfds"),
                                  splits=(("train", 0.5), ("validation", 0.25), ("test", 0.25))))
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-c", SMOKE, str(work), str(tmp_path / "tfds")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((work / "results.json").read_text())
    assert np.isfinite(metrics["val_caption_ppl"]) and np.isfinite(metrics["val_t2i_image_loss"])
    assert not any(k.startswith(("t2i_shape", "t2i_prompt", "gt_")) for k in metrics)  # no rule checker
    for name in ("text_to_image.png", "image_to_text.png", "captions.txt", "eval.json"):
        assert (work / "samples" / name).exists()
    assert "exceed data.max_caption_len=6" in proc.stderr
