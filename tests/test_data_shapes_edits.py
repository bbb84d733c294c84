"""shapes_edits: every edit is the named change (attributes and pixels), untouched objects intact."""
import numpy as np
import pytest

from mmjax.data import builders, shapes, shapes_edits
from mmjax.evals import shapes_checker

CELL = 32 / shapes.GRID


def _chains(split, n, seed=0, max_objects=3):
    return [shapes_edits.generate_chain(seed, split, c, 32, max_objects) for c in range(n)]


def _rows(rec):
    return shapes.canonical(rec["attributes"])


def _cell_slices(x, y):
    """Pixel rows/cols whose centres fall in cell (x, y)."""
    centres = np.arange(32) + 0.5
    return (centres // CELL == y), (centres // CELL == x)


def test_layout_determinism_and_seed():
    chain = shapes_edits.generate_chain(0, "train", 3)
    assert len(chain) == shapes_edits.CHAIN_IMAGES
    assert [int(r["label"]) for r in chain] == list(range(shapes_edits.CHAIN_IMAGES))
    assert [int(r["index"]) for r in chain] == [12, 13, 14, 15]
    assert chain[0]["caption"] == shapes.caption_from_attributes(chain[0]["attributes"])
    rec = shapes_edits.generate_record(0, "train", 13)
    assert rec["caption"] == chain[1]["caption"] and np.array_equal(rec["image"], chain[1]["image"])
    shapes_edits.generate_chain.cache_clear()
    again = shapes_edits.generate_chain(0, "train", 3)
    assert all(np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
               for a, b in zip(chain, again))
    other = shapes_edits.generate_chain(1, "train", 3)
    assert any(a["caption"] != b["caption"] for a, b in zip(chain, other))


def test_splits_disjoint_by_first_image():
    starts = {}
    for split in shapes.SPLITS:
        for chain in _chains(split, 40):
            assert shapes.split_of_attributes(chain[0]["attributes"]) == split
            starts.setdefault(split, set()).add(_rows(chain[0]).tobytes())
    assert not (starts["train"] & starts["validation"]) and not (starts["train"] & starts["test"])


def test_instruction_grammar_roundtrip_and_rejects():
    row_a = np.array([0, 0, 1, 0, 0], np.int32)  # large red circle, top left
    row_b = np.array([0, 0, 1, 2, 2], np.int32)
    text = shapes_edits.instruction("move", row_a, row_b)
    assert text == "move the large red circle at the top left to the bottom right"
    op, before, after = shapes_edits.parse_instruction(text)
    assert op == "move" and np.array_equal(before, row_a) and np.array_equal(after, row_b)
    for bad in ("move the large red circle", "paint it blue", "make the large red circle huge"):
        with pytest.raises(ValueError):
            shapes_edits.parse_instruction(bad)
    with pytest.raises(ValueError, match="not in"):  # names an object that is not there
        shapes_edits.apply_edit(np.array([[1, 1, 0, 1, 1]]), text)


def test_each_edit_is_the_named_change_in_attributes_and_pixels():
    ops = set()
    for chain in _chains("train", 60):
        for a, b in zip(chain[:-1], chain[1:]):
            op, before, after = shapes_edits.parse_instruction(b["caption"])
            ops.add(op)
            rows_a, rows_b = _rows(a), _rows(b)
            # Attributes: B is A with exactly the instruction applied.
            assert np.array_equal(shapes_edits.apply_edit(rows_a, b["caption"]), rows_b)
            # Pixels: the rule checker reads A and B back exactly ...
            assert np.array_equal(shapes_checker.detect_objects(a["image"]), rows_a)
            assert np.array_equal(shapes_checker.detect_objects(b["image"]), rows_b)
            # ... and only the edited object's cells changed (untouched objects pixel-identical).
            touched = np.zeros((32, 32), bool)
            for row in (before, after):
                if row is not None:
                    ys, xs = _cell_slices(int(row[3]), int(row[4]))
                    touched |= ys[:, None] & xs[None, :]
            changed = np.any(a["image"] != b["image"], axis=-1)
            assert changed.any() and not (changed & ~touched).any(), (op, b["caption"])
            untouched = [r for r in rows_a if before is None or not np.array_equal(r, before)]
            found = {tuple(r) for r in shapes_checker.detect_objects(b["image"])}
            assert all(tuple(r) in found for r in untouched)
    assert ops == set(shapes_edits.OPS)


def test_one_object_chains_stay_valid():
    for chain in _chains("train", 20, max_objects=1):
        for rec in chain:
            assert len(_rows(rec)) == 1


def test_builder_writes_chains(tmp_path):
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(name="shapes_edits", image_size=32, num_train=3,
                                         num_validation=1, num_test=1, max_objects=3, seed=0))
    builder = builders.prepare_embedded(cfg, str(tmp_path))
    train = builder.as_data_source("train")
    assert len(train) == 3 * shapes_edits.CHAIN_IMAGES
    rec = train[5]
    expected = shapes_edits.generate_record(0, "train", 5)
    assert np.array_equal(rec["image"], expected["image"]) and int(rec["label"]) == 1
