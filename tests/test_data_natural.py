"""Embedded natural-image set: determinism per seed, disjoint held-out regions, the TFDS build."""
import ml_collections
import numpy as np
import pytest

from mmjax.data import builders, natural, pipeline


def test_records_are_deterministic_per_seed():
    a = [natural.generate_record(0, "train", i, 16) for i in range(12)]
    b = [natural.generate_record(0, "train", i, 16) for i in range(12)]
    c = [natural.generate_record(1, "train", i, 16) for i in range(12)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["label"] == y["label"]
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
    assert len({r["image"].tobytes() for r in a}) == len(a)  # distinct crops


def test_split_tiles_are_disjoint_and_cover_the_photos():
    parts = {s: set(natural.split_tiles(s)) for s in natural.SPLITS}
    assert not parts["train"] & parts["validation"] and not parts["train"] & parts["test"]
    assert not parts["validation"] & parts["test"]
    n_tiles = natural.TILE_GRID[0] * natural.TILE_GRID[1]
    assert set.union(*parts.values()) == {(p, t) for p in range(2) for t in range(n_tiles)}
    for photo in natural.photos():
        boxes = natural.tile_boxes(*photo.shape[:2])
        cover = np.zeros(photo.shape[:2], int)
        for top, left, bottom, right in boxes:
            cover[top:bottom, left:right] += 1
        assert (cover == 1).all()  # the tiles partition the photo


def _pixel_masks(split, n, seed=0):
    masks = [np.zeros(p.shape[:2], bool) for p in natural.photos()]
    sides = set()
    for i in range(n):
        rng = np.random.default_rng([seed, natural.SPLITS.index(split), i])
        _, _, info = natural.photo_crop(rng, split, 16)
        top, left, bottom, right = info["box"]
        masks[info["photo"]][top:bottom, left:right] = True
        sides.add(bottom - top)
    return masks, sides


def test_train_and_held_out_crops_share_no_pixel():
    train, sides = _pixel_masks("train", 400)
    val, _ = _pixel_masks("validation", 200)
    test, _ = _pixel_masks("test", 200)
    for t, v, s in zip(train, val, test):
        assert not (t & v).any() and not (t & s).any() and not (v & s).any()
        assert v.any() or s.any() or t.any()
    assert len(sides) >= 4  # several crop scales


def test_crops_come_from_the_photos_with_flips():
    rng = np.random.default_rng(7)
    seen_flip = set()
    for _ in range(20):
        img, caption, info = natural.photo_crop(rng, "train", 32)
        top, left, bottom, right = info["box"]
        if bottom - top == 32:  # no resampling at this scale: the exact (flipped) pixels
            patch = natural.photos()[info["photo"]][top:bottom, left:right]
            np.testing.assert_array_equal(img, patch[:, ::-1] if info["flip"] else patch)
        seen_flip.add(info["flip"])
        assert caption == f"a crop of the {natural.PHOTOS[info['photo']]} photo"
    assert seen_flip == {True, False}


def test_digits_are_mixed_in():
    records = [natural.generate_record(0, "validation", i, 16) for i in range(200)]
    labels = np.array([int(r["label"]) for r in records])
    assert 0 < (labels >= 0).sum() < 80  # ~12.5% digits, the rest photo crops (label -1)
    for r in records:
        assert r["caption"].startswith("a handwritten digit" if r["label"] >= 0 else "a crop of")


def test_tfds_build_shapes_and_dtypes(tmp_path):
    cfg = ml_collections.ConfigDict(dict(
        name="natural", data_dir=str(tmp_path / "data"), image_size=16, num_train=24,
        num_validation=8, num_test=8, max_objects=3, seed=3, image_key="image",
        caption_key="caption", label_key="label"))
    pipeline.build_dataset(cfg, cfg.data_dir)  # the data stage's half
    ds = pipeline.image_caption_dataset(cfg, "validation", cfg.data_dir)
    assert len(ds) == 8
    rec = ds[5]
    assert rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.uint8
    assert isinstance(rec["caption"], str) and rec["attributes"].shape == (3, 5)
    assert int(rec["index"]) == 5
    np.testing.assert_array_equal(rec["image"], natural.generate_record(3, "validation", 5, 16)["image"])
    assert builders.config_from_data_cfg(cfg).name == "s16_tr24_va8_te8_o3_seed3"


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        natural.generate_record(0, "dev", 0)
