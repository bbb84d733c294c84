"""Record datasets (TFDS prepare, no TensorFlow) and resumable, sharded grain batches."""
import io
import os
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax import config_defaults
from mmjax.data import builders, digits, pipeline, shapes
from mmjax.errors import MissingArtifactError
from mmjax.workdir import Workdir


def _cfg(**overrides):
    cfg = config_defaults.data_config()
    cfg.update(dict(num_train=64, num_validation=16, num_test=16, image_size=32), **overrides)
    return cfg


def _dataset(cfg, split, workdir):
    """What a stage sees after the data stage ran: build (idempotent), then read."""
    data_dir = Workdir.from_config({"data": cfg}, workdir).data_dir
    pipeline.build_dataset(cfg, data_dir)
    return pipeline.image_caption_dataset(cfg, split, data_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def train_ds(workdir):
    return _dataset(_cfg(), "train", workdir)


def test_shapes_records_match_generator_without_tensorflow(train_ds, workdir):
    assert len(train_ds) == 64 and "tensorflow" not in sys.modules
    for i in (0, 17, 63):
        rec, ref = train_ds[i], shapes.generate_record(0, "train", i, 32, 3)
        assert set(rec) == {"image", "caption", "attributes", "label", "index"}
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
        assert np.array_equal(rec["image"], ref["image"]) and rec["caption"] == ref["caption"]
        assert np.array_equal(rec["attributes"], ref["attributes"]) and rec["attributes"].dtype == np.int32
        assert rec["index"] == i and rec["index"].dtype == np.int64 and rec["label"] == -1
    assert os.path.isdir(os.path.join(workdir, "data", "mmjax_shapes", "s32_tr64_va16_te16_o3_seed0"))


def test_prepare_is_idempotent_and_settings_do_not_collide(train_ds, workdir):
    version_dir = builders.embedded_builder(_cfg(), os.path.join(workdir, "data")).data_dir
    stamp = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    _dataset(_cfg(), "validation", workdir)
    assert stamp == {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
    other = _dataset(_cfg(seed=1, num_train=8), "train", workdir)
    assert len(other) == 8 and not np.array_equal(other[0]["image"], train_ds[0]["image"])
    assert len(train_ds) == 64  # still there


def test_splits_disjoint(workdir, train_ds):
    val = _dataset(_cfg(), "validation", workdir)
    test = _dataset(_cfg(), "test", workdir)
    sets = [{shapes.canonical(r["attributes"]).tobytes() for r in d} for d in (train_ds, val, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]


def test_reading_an_unbuilt_embedded_set_names_the_data_stage(tmp_path):
    with pytest.raises(MissingArtifactError, match=r"not built in .*; run --mode=data"):
        pipeline.image_caption_dataset(_cfg(), "train", tmp_path / "data")
    assert list(tmp_path.iterdir()) == []  # reading never generates


def test_building_and_reading_leave_no_temporary_directory(tmp_path, monkeypatch):
    # TFDS's DatasetInfo.initialize_from_bucket made one empty tmp*tfds per unbuilt builder.
    scratch = tmp_path / "system_tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with pytest.raises(MissingArtifactError):
        pipeline.image_caption_dataset(_cfg(num_train=8), "train", tmp_path / "data")
    assert len(_dataset(_cfg(num_train=8), "train", str(tmp_path / "work"))) == 8
    assert list(scratch.iterdir()) == []


def test_digits_via_pipeline(workdir):
    ds = _dataset(_cfg(name="digits", num_train=40, num_test=500), "test", workdir)
    assert len(ds) == 180  # cap above the fixed split size
    rec = ds[5]
    assert digits.parse_caption(rec["caption"]) == rec["label"] and rec["image"].shape == (32, 32, 3)


def test_unknown_split_and_bad_config(workdir):
    with pytest.raises(ValueError, match="dev"):
        _dataset(_cfg(), "dev", workdir)
    with pytest.raises(ValueError, match="max_objects"):
        _dataset(_cfg(max_objects=12), "train", workdir)


def test_missing_standard_dataset_names_it_and_data_dir(tmp_path):
    for name in ("mnist", "no_such_dataset_xyz"):
        with pytest.raises(ValueError) as err:
            _dataset(_cfg(name=name, data_dir=str(tmp_path)), "train", "unused")
        assert name in str(err.value) and str(tmp_path) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written


class MmjaxTestPets(tfds.core.GeneratorBasedBuilder):
    """A 'standard' TFDS dataset: encoded non-square images and class labels, no captions."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "great_dane"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 12, 3), 60 * i, np.uint8)).save(buf, format="PNG")
            buf.seek(0)
            yield i, {"image": buf, "label": i % 2}


def test_standard_tfds_dataset_resized_and_captioned_from_labels(tmp_path):
    MmjaxTestPets(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _cfg(name="mmjax_test_pets", data_dir=str(tmp_path), caption_key="")
    ds = _dataset(cfg, "train", "unused")
    seen = set()
    for rec in ds:  # TFDS shuffles standard datasets on write: identify examples by pixel value
        example = int(rec["image"][0, 0, 0]) // 60
        assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
        assert np.all(rec["image"] == 60 * example) and rec["label"] == example % 2
        assert rec["caption"] == ("a photo of a cat", "a photo of a great dane")[example % 2]
        assert np.all(rec["attributes"] == -1) and rec["attributes"].shape == (3, 5)
        seen.add(example)
    assert seen == {0, 1, 2, 3}
    # The default caption_key ("caption") is absent: labels are used, with a warning.
    default = _dataset(_cfg(name="mmjax_test_pets", data_dir=str(tmp_path)), "train", "x")
    assert [r["caption"] for r in default] == [r["caption"] for r in ds]


def test_corrupt_records_raise_naming_split_and_index():
    spec = pipeline.RecordSpec("shapes", 32, 3)
    good = shapes.generate_record(0, "train", 0)
    bad = [
        dict(good, image=np.zeros((32, 32, 3), np.float32)),
        dict(good, image=np.zeros((32, 32, 3, 1), np.uint8)),
        {k: v for k, v in good.items() if k != "image"},
        dict(good, caption=b""),
        {k: v for k, v in good.items() if k != "caption"},
        dict(good, attributes=np.zeros((2, 5), np.int32)),
    ]
    ds = pipeline.records_from_source([good] + bad, spec, "validation")
    assert ds[0]["caption"] == good["caption"]
    for i in range(1, len(bad) + 1):
        with pytest.raises(ValueError, match=rf"split 'validation' record {i}\b"):
            ds[i]


def _ids(batches):
    return [b["index"].tolist() for b in batches]


def test_batches_deterministic_shuffled_and_resumable(train_ds):
    make = lambda: iter(pipeline.batched_iterator(train_ds, 8, seed=3, shuffle=True))
    it = make()
    first = [next(it) for _ in range(3)]
    assert set(first[0]) == {"image", "attributes", "label", "index"}  # strings dropped
    assert first[0]["image"].shape == (8, 32, 32, 3) and first[0]["image"].dtype == np.uint8
    state = it.get_state()
    rest = [next(it) for _ in range(10)]  # crosses the epoch boundary (8 batches per epoch)
    assert _ids([next(make())]) == _ids(first[:1])
    epoch1 = sorted(sum(_ids(first + rest[:5]), []))
    assert epoch1 == list(range(64)) and _ids(first + rest[:5]) != [list(range(i, i + 8)) for i in range(0, 64, 8)]
    assert _ids(rest[5:8]) != _ids(first)  # reshuffled next epoch
    restored = make()
    restored.set_state(state)
    assert _ids([next(restored) for _ in range(10)]) == _ids(rest)
    other_seed = iter(pipeline.batched_iterator(train_ds, 8, seed=4, shuffle=True))
    assert _ids([next(other_seed)]) != _ids(first[:1])


def test_read_threads_change_neither_the_batches_nor_the_resume_point(train_ds):
    """data.read_threads is a speed knob: 1 thread yields the batches 4 do, and a run may resume
    with another thread count from the iterator state of the first."""
    make = lambda n: iter(pipeline.batched_iterator(train_ds, 8, seed=3, shuffle=True, read_threads=n))
    four, one = make(4), make(1)
    assert _ids([next(four) for _ in range(10)]) == _ids([next(one) for _ in range(10)])
    resumed = make(1)
    resumed.set_state(four.get_state())
    assert _ids([next(resumed) for _ in range(4)]) == _ids([next(four) for _ in range(4)])


def test_orbax_checkpoint_of_iterator(train_ds, tmp_path):
    import orbax.checkpoint as ocp

    ds = pipeline.batched_iterator(train_ds, 4, seed=0, shuffle=True, keep_strings=True)
    it = iter(ds)
    batch = next(it)
    assert batch["caption"].dtype.kind == "U" and batch["caption"].shape == (4,)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _ids([next(it) for _ in range(5)])
    fresh = iter(ds)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _ids([next(fresh) for _ in range(5)]) == expected


def test_process_sharding_disjoint_and_balanced(train_ds):
    ds = train_ds[:63]  # not divisible by 2: one example is cut so both processes match
    shards = [list(pipeline.batched_iterator(ds, 8, seed=0, shuffle=True, num_epochs=1, process_index=p,
                                             process_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 7 and shards[0][0]["image"].shape[0] == 4
    ids = [set(sum(_ids(s), [])) for s in shards]
    assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1]) == 28
    no_drop = list(pipeline.batched_iterator(ds, 8, seed=0, shuffle=False, num_epochs=1, drop_remainder=False))
    assert sum(len(b["index"]) for b in no_drop) == 63 and _ids(no_drop)[0] == list(range(8))


def test_batching_errors(train_ds):
    with pytest.raises(ValueError, match="process_count"):
        pipeline.batched_iterator(train_ds, 9, seed=0, shuffle=False, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.batched_iterator(train_ds, 8, seed=0, shuffle=False, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch"):
        pipeline.batched_iterator(train_ds[:4], 8, seed=0, shuffle=False, num_epochs=1)


def test_block_shuffle_keeps_blocks_whole_reshuffles_and_resumes(train_ds):
    """shuffle_block=4: each batch is whole blocks of 4 consecutive elements in their order, the
    block order is fresh every epoch, resume is exact, and 2 processes read the 1-process batches."""
    make = lambda **kw: iter(pipeline.batched_iterator(train_ds, 8, seed=3, shuffle=True,
                                                       shuffle_block=4, **kw))
    it = make()
    epoch = _ids([next(it) for _ in range(8)])
    for batch in epoch:
        for block in (batch[:4], batch[4:]):
            assert block[0] % 4 == 0 and block == list(range(block[0], block[0] + 4))
    assert sorted(sum(epoch, [])) == list(range(64))
    assert epoch != [list(range(i, i + 8)) for i in range(0, 64, 8)]  # blocks shuffled
    state = it.get_state()
    rest = _ids([next(it) for _ in range(8)])
    assert rest != epoch and sorted(sum(rest, [])) == list(range(64))  # next epoch, new order
    restored = make()
    restored.set_state(state)
    assert _ids([next(restored) for _ in range(8)]) == rest
    shards = [make(process_index=p, process_count=2) for p in range(2)]
    halves = [_ids([next(s) for _ in range(8)]) for s in shards]
    assert [a + b for a, b in zip(*halves)] == epoch
    tail = list(pipeline.batched_iterator(train_ds[:63], 8, seed=3, shuffle=True, shuffle_block=4,
                                          num_epochs=1))
    seen = sum(_ids(tail), [])  # 63 = 15 blocks + 3 left out; 7 batches of the 60
    assert len(seen) == len(set(seen)) == 56 and max(seen) < 60
    with pytest.raises(ValueError, match="4 rows per process: not whole blocks of 8.*"
                                         "direction_group_rows"):
        pipeline.batched_iterator(train_ds, 8, seed=0, shuffle=True, shuffle_block=8,
                                  process_count=2)
