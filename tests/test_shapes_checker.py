"""The rule checker is exact on ground truth and fails on mismatched prompts."""
import numpy as np
import pytest

from mmjax.data import shapes
from mmjax.evals import shapes_checker


def _batch(n, size, split="test"):
    recs = [shapes.generate_record(0, split, i, size, 3) for i in range(n)]
    return (np.stack([r["image"] for r in recs]), np.stack([r["attributes"] for r in recs]),
            [r["caption"] for r in recs])


@pytest.mark.parametrize("size", [32, 64])
def test_exact_on_ground_truth_and_low_on_shuffled(size):
    images, attrs, _ = _batch(200 if size == 32 else 100, size)
    scores = shapes_checker.score_batch(images, attrs)
    rates = {k: v for k, v in scores.items() if not k.endswith(("_lo", "_n"))}
    assert all(v == 1.0 for v in rates.values()), scores  # the upper bounds (_hi) too
    shuffled = shapes_checker.score_batch(images, np.roll(attrs, 1, axis=0))
    assert shuffled["prompt_acc"] < 0.1 and shuffled["object_acc"] < 0.2, shuffled


def test_every_single_object_at_every_jitter():
    """All shapes x sizes, extreme sub-pixel placements, one colour and cell (others are symmetric)."""
    for size in (32, 64):
        for shape in range(len(shapes.SHAPES)):
            for sz in range(len(shapes.SIZES)):
                for jitter in [(-1, -1), (1, 1), (-1, 1), (0.3, -0.7)]:
                    attrs = np.array([[shape, 4, sz, 2, 1]], np.int32)
                    found = shapes_checker.detect_objects(shapes.render(attrs, size, np.array([jitter])))
                    assert np.array_equal(found, attrs), (size, attrs, jitter, found)


def test_check_image_reports_each_attribute():
    attrs = np.array([[0, 0, 1, 0, 0], [1, 2, 0, 2, 2], [-1] * 5], np.int32)
    wrong = attrs.copy()
    wrong[0, 0] = 2  # triangle instead of circle
    wrong[1, 3:] = (1, 1)  # moved to the centre
    result = shapes_checker.check_image(shapes.render(wrong, 32), attrs)
    first, second = result["objects"]
    assert not first["shape"] and first["color"] and first["size"] and first["position"]
    assert second["shape"] and not second["position"] and not result["correct"] and result["count"]
    extra = np.concatenate([wrong[:2], [[1, 3, 1, 0, 2]]])
    assert not shapes_checker.check_image(shapes.render(extra, 32), attrs)["count"]
    blank = np.zeros((32, 32, 3), np.uint8)
    assert shapes_checker.score_batch(blank[None], attrs[None])["prompt_acc"] == 0.0
    with pytest.raises(ValueError, match="uint8"):
        shapes_checker.check_image(blank.astype(np.float32), attrs)


def test_tolerates_mild_noise():
    images, attrs, _ = _batch(32, 64)
    noisy = np.clip(images.astype(int) + np.random.default_rng(0).integers(-40, 41, images.shape), 0, 255)
    assert shapes_checker.score_batch(noisy.astype(np.uint8), attrs)["prompt_acc"] == 1.0


def test_caption_accuracy():
    _, attrs, captions = _batch(40, 32)
    assert shapes_checker.caption_accuracy(captions, attrs)["exact_acc"] == 1.0
    shuffled = shapes_checker.caption_accuracy(captions[1:] + captions[:1], attrs)
    assert shuffled["exact_acc"] < 0.1
    garbage = shapes_checker.caption_accuracy(["hello world"] * 40, attrs)
    assert garbage["parse_rate"] == 0.0 and garbage["exact_acc"] == 0.0 and garbage["color_acc"] == 0.0
    # One attribute wrong: exact fails, that attribute's accuracy drops, the others stay.
    one = shapes.canonical(attrs[0])
    changed = one.copy()
    changed[0, 1] = (changed[0, 1] + 1) % len(shapes.COLORS)
    scores = shapes_checker.caption_accuracy([shapes.caption_from_attributes(changed)], attrs[:1])
    assert scores["exact_acc"] == 0.0 and scores["shape_acc"] == 1.0 and scores["color_acc"] < 1.0
