"""Procedural shapes: determinism, split disjointness, caption <-> attributes <-> pixels."""
import numpy as np
import pytest

from mmjax.data import shapes


def _records(split, n, size=32, seed=0, max_objects=3):
    return [shapes.generate_record(seed, split, i, size, max_objects) for i in range(n)]


def test_record_format_and_determinism():
    rec = shapes.generate_record(0, "train", 5, 64, 3)
    assert rec["image"].shape == (64, 64, 3) and rec["image"].dtype == np.uint8
    assert rec["attributes"].shape == (3, 5) and rec["attributes"].dtype == np.int32
    assert rec["label"] == -1 and rec["index"] == 5 and isinstance(rec["caption"], str)
    again = shapes.generate_record(0, "train", 5, 64, 3)
    assert np.array_equal(rec["image"], again["image"]) and rec["caption"] == again["caption"]
    other_seed = shapes.generate_record(1, "train", 5, 64, 3)
    assert not np.array_equal(rec["image"], other_seed["image"])


def test_object_count_padding_and_background():
    counts = set()
    for rec in _records("train", 64, max_objects=4):
        rows = shapes.valid_rows(rec["attributes"])
        counts.add(len(rows))
        assert np.all(rec["attributes"][len(rows):] == -1)
        assert np.array_equal(rec["image"][0, 0], shapes.BACKGROUND)  # corners are background
        # Distinct cells, hence no overlap.
        assert len({(r[3], r[4]) for r in rows}) == len(rows)
        # Exactly the requested colours appear in the pixels.
        present = {tuple(c) for c in rec["image"].reshape(-1, 3)} - {tuple(shapes.BACKGROUND)}
        assert present == {tuple(shapes.PALETTE[c]) for c in rows[:, 1]}
    assert counts == {1, 2, 3, 4}


def test_splits_disjoint_by_attribute_set_and_image():
    seen = {}
    for split in shapes.SPLITS:
        for rec in _records(split, 96):
            key = shapes.canonical(rec["attributes"]).tobytes()
            assert shapes.split_of_attributes(rec["attributes"]) == split
            assert seen.setdefault(key, split) == split, "attribute set shared across splits"
    images = {split: {r["image"].tobytes() for r in _records(split, 96)} for split in shapes.SPLITS}
    assert not images["train"] & images["validation"] and not images["train"] & images["test"]
    assert not images["validation"] & images["test"]


def test_caption_roundtrip_and_example():
    attrs = np.array([[2, 2, 0, 1, 1], [0, 0, 1, 0, 0], [-1] * 5], np.int32)
    cap = shapes.caption_from_attributes(attrs)
    assert cap == "a large red circle at the top left and a small blue triangle in the center"
    assert np.array_equal(shapes.parse_caption(cap, max_objects=3), shapes.pad_attributes(shapes.canonical(attrs), 3))
    for rec in _records("validation", 64):
        assert np.array_equal(shapes.parse_caption(rec["caption"], 3), rec["attributes"])
    # Case, spacing and a final period are tolerated.
    assert np.array_equal(shapes.parse_caption("  A Large red circle at the top left. "), attrs[1:2])


@pytest.mark.parametrize("bad", ["", "a red circle", "a large red circle at the top left and", "a huge red circle in the center",
                                  "a large red circle in the center and a small blue square in the center"])
def test_parse_caption_rejects(bad):
    with pytest.raises(ValueError):
        shapes.parse_caption(bad)


def test_render_matches_record_without_jitter_positions():
    attrs = np.array([[1, 3, 1, 2, 0]], np.int32)
    img = shapes.render(attrs, 32)
    ys, xs = np.nonzero(img.any(-1))
    cell = 32 / 3
    assert int(xs.mean() // cell) == 2 and int(ys.mean() // cell) == 0
    assert np.all(img[ys, xs] == shapes.PALETTE[3])


def test_bad_inputs():
    with pytest.raises(ValueError, match="split"):
        shapes.generate_record(0, "dev", 0)
    with pytest.raises(ValueError, match="max_objects"):
        shapes.generate_record(0, "train", 0, max_objects=10)
    with pytest.raises(ValueError, match="image_size"):
        shapes.render(np.zeros((1, 5), np.int32), 16)
    with pytest.raises(ValueError, match="color"):
        shapes.render(np.array([[0, 99, 0, 0, 0]]), 32)
    with pytest.raises(ValueError, match="cell"):
        shapes.render(np.array([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]), 32)
