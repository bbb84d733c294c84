"""scikit-learn digits: fixed disjoint splits, RGB upsampling, captions and their parser."""
import numpy as np
import pytest

from mmjax.data import digits


def test_splits_fixed_disjoint_and_complete():
    parts = [digits.split_indices(s) for s in digits.SPLITS]
    assert [len(p) for p in parts] == [1437, 180, 180]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == 1797
    assert np.array_equal(digits.split_indices("test"), parts[2])  # same on every call
    assert digits.split_size("train", 64) == 64 and digits.split_size("test", 10_000) == 180
    with pytest.raises(ValueError, match="split"):
        digits.split_indices("dev")


@pytest.mark.parametrize("size", [32, 64])
def test_record(size):
    rec = digits.generate_record("validation", 3, size, max_objects=2)
    assert rec["image"].shape == (size, size, 3) and rec["image"].dtype == np.uint8
    assert np.array_equal(rec["image"][..., 0], rec["image"][..., 2])  # grayscale in RGB
    assert rec["image"].max() > 200 and rec["image"].min() == 0
    assert rec["attributes"].shape == (2, 5) and np.all(rec["attributes"] == -1)
    assert rec["index"] == 3 and 0 <= rec["label"] <= 9
    assert digits.parse_caption(rec["caption"]) == rec["label"]
    again = digits.generate_record("validation", 3, size, max_objects=2)
    assert np.array_equal(rec["image"], again["image"])


def test_images_follow_labels_source():
    images, labels = digits._load()
    source = digits.split_indices("train")[5]
    rec = digits.generate_record("train", 5, 8)
    assert rec["label"] == labels[source]
    assert np.array_equal(rec["image"][..., 0], np.round(images[source] * 255 / 16).astype(np.uint8))


def test_captions():
    assert digits.caption_from_label(7) == "a handwritten digit seven"
    assert digits.parse_caption(" A handwritten digit Seven. ") == 7
    for bad in ["a handwritten digit", "a digit seven", "a handwritten digit ten", ""]:
        with pytest.raises(ValueError):
            digits.parse_caption(bad)
    with pytest.raises(ValueError):
        digits.caption_from_label(10)
    with pytest.raises(ValueError, match="out of range"):
        digits.generate_record("test", 180)
