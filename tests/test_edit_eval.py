"""Edit scores: 1 on the true edits, the do-nothing copy edits nothing but preserves everything,
and damaging an untouched object fails both."""
import numpy as np
import pytest

from mmjax.data import shapes, shapes_edits
from mmjax.evals import edits


def _pairs(n=30):
    chains = [shapes_edits.generate_chain(0, "test", c) for c in range(n)]
    return [c[0] for c in chains], [c[1] for c in chains]


def _score(images, firsts, seconds):
    return edits.score_edits(np.stack(images), np.stack([r["attributes"] for r in firsts]),
                             np.stack([r["attributes"] for r in seconds]),
                             [r["caption"] for r in seconds])


def test_truth_scores_one_and_copy_edits_nothing():
    firsts, seconds = _pairs()
    truth = _score([r["image"] for r in seconds], firsts, seconds)
    assert truth["edit_acc"] == 1.0 and truth["preserve_acc"] == 1.0 and truth["edit_acc_n"] == 30
    assert truth["edit_acc_lo"] < 1.0 == truth["edit_acc_hi"]
    assert any(k.startswith("edit_acc_") and k[9:] in shapes_edits.OPS for k in truth)
    copy = _score([r["image"] for r in firsts], firsts, seconds)
    assert copy["edit_acc"] == 0.0 and copy["preserve_acc"] == 1.0


def test_damaged_untouched_object_fails_edit_and_preserve():
    firsts, seconds = _pairs()
    done = 0
    for a, b in zip(firsts, seconds):
        kept = edits.untouched_objects(a["attributes"], b["attributes"])
        if not len(kept):
            continue
        rows = shapes.canonical(b["attributes"]).copy()
        hit = np.nonzero(np.all(rows == kept[0], axis=1))[0][0]
        rows[hit, 1] = (rows[hit, 1] + 1) % len(shapes.COLORS)  # recolour an untouched object
        got = _score([shapes.render(rows)], [a], [b])
        assert got["edit_acc"] == 0.0 and got["preserve_acc"] == 0.0
        done += 1
    assert done > 10


def test_untouched_objects_and_bad_lengths():
    a = np.array([[0, 0, 1, 0, 0], [1, 1, 0, 2, 2]])
    b = np.array([[0, 2, 1, 0, 0], [1, 1, 0, 2, 2]])  # the circle recoloured
    np.testing.assert_array_equal(edits.untouched_objects(a, b), [[1, 1, 0, 2, 2]])
    with pytest.raises(ValueError, match="must agree"):
        edits.score_edits(np.zeros((2, 32, 32, 3), np.uint8), a[None], b[None], ["x"])
