"""Packer: exact layouts, next-token targets, loss masks, segments and random-access packing."""
import grain
import numpy as np
import pytest

from mmjax.data import packing

SP = packing.SpecialIds(bos=2, eos=3, boi=4, eoi=5, uncond=6)
D = 3
TABLE = np.random.default_rng(0).uniform(-1, 1, (64, D)).astype(np.float32)  # stand-in FSQ codebook


def _doc(direction, caption=(10, 11, 12), image=(7, 8), drop=False):
    image = np.array(image)
    return packing.build_document(list(caption), image, TABLE[image], direction, SP, drop_caption=drop)


def test_layouts_exactly_as_specified():
    assert _doc("t2i")["tokens"].tolist() == [2, 10, 11, 12, 4, 7, 8, 5, 3]
    assert _doc("t2i")["modality"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert _doc("t2i", drop=True)["tokens"].tolist() == [2, 6, 4, 7, 8, 5, 3]  # <uncond> caption
    assert _doc("i2t")["tokens"].tolist() == [2, 4, 7, 8, 5, 10, 11, 12, 3]
    assert _doc("i2t")["modality"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]
    for direction in packing.DIRECTIONS:
        doc = _doc(direction)
        assert len(doc["tokens"]) == packing.document_length(3, 2)
        assert doc["positions"].tolist() == list(range(9))
        img = doc["modality"] == 1
        np.testing.assert_array_equal(doc["codes"][img], TABLE[[7, 8]])
        assert not doc["codes"][~img].any()
    assert _doc("i2t")["image_block"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert not _doc("t2i")["image_block"].any()
    assert _doc("t2i")["image_pos"].tolist() == [-1] * 5 + [0, 1] + [-1] * 2
    assert _doc("i2t")["image_pos"].tolist() == [-1] * 2 + [0, 1] + [-1] * 5


def test_dropped_caption_document_differs_from_image_to_caption():
    """The defect this guards: with an empty caption the CFG-unconditional document was
    `<bos> <boi> img <eoi>`, token for token the prefix of an image->caption document."""
    dropped, i2t = _doc("t2i", drop=True), _doc("i2t")
    n = 2 + 2 + 1  # <bos> <boi> img img <eoi>
    assert dropped["tokens"][:n].tolist() != i2t["tokens"][:n].tolist()
    assert dropped["tokens"][1] == SP.uncond and SP.uncond not in i2t["tokens"]


@pytest.mark.parametrize("direction,drop", [("t2i", False), ("t2i", True), ("i2t", False)])
def test_targets_are_next_token_and_masks(direction, drop):
    doc = _doc(direction, drop=drop)
    tokens, modality = doc["tokens"], doc["modality"]
    n = len(tokens)
    for i in range(n - 1):
        if modality[i + 1] == 0:
            assert doc["text_targets"][i] == tokens[i + 1] and doc["text_mask"][i] == 1
            assert doc["index_targets"][i] == 0 and doc["image_mask"][i] == 0 and not doc["code_targets"][i].any()
        else:
            assert doc["index_targets"][i] == tokens[i + 1] and doc["text_mask"][i] == 0
            np.testing.assert_array_equal(doc["code_targets"][i], TABLE[tokens[i + 1]])
            assert doc["image_mask"][i] == (direction == "t2i")
    # The last token predicts nothing; text loss covers caption, <boi>, <eoi> and <eos>.
    assert doc["text_mask"][-1] == 0 and doc["image_mask"][-1] == 0
    assert doc["text_mask"].sum() == n - 1 - 2
    targets = set(doc["text_targets"][doc["text_mask"] > 0].tolist())
    assert {SP.eoi, SP.eos, SP.boi} <= targets and (drop or {10, 11, 12} <= targets)
    assert doc["image_mask"].sum() == (2 if direction == "t2i" else 0)


@pytest.mark.parametrize("drop", [False, True])
def test_no_caption_loss_in_t2i_keeps_every_other_target(drop):
    image = np.array((7, 8))
    args = ([10, 11, 12], image, TABLE[image])
    with_loss = packing.build_document(*args, "t2i", SP, drop_caption=drop)
    without = packing.build_document(*args, "t2i", SP, drop_caption=drop, t2i_caption_loss=False)
    predicted = without["text_targets"][without["text_mask"] > 0].tolist()
    assert predicted == [SP.boi, SP.eoi, SP.eos]  # caption / <uncond> no longer predicted
    for key in ("tokens", "codes", "code_targets", "image_mask", "image_block"):
        np.testing.assert_array_equal(with_loss[key], without[key])
    i2t = packing.build_document(*args, "i2t", SP, t2i_caption_loss=False)  # i2t keeps its caption
    np.testing.assert_array_equal(i2t["text_mask"], _doc("i2t")["text_mask"])


def test_pack_documents_segments_positions_padding():
    docs = [_doc("t2i"), _doc("i2t", caption=(9,)), _doc("t2i", drop=True)]
    row = packing.pack_documents(docs, 32, D)
    assert set(row) == set(packing.PACKED_KEYS)
    assert row["codes"].shape == (32, D) and row["code_targets"].shape == (32, D)
    assert row["segment_ids"].tolist() == [1] * 9 + [2] * 7 + [3] * 7 + [0] * 9
    assert row["positions"].tolist() == list(range(9)) + list(range(7)) + list(range(7)) + [0] * 9
    assert row["image_block"].tolist() == [0] * 9 + [0, 0, 2, 2, 0, 0, 0] + [0] * 16
    assert row["image_pos"].tolist() == ([-1] * 5 + [0, 1, -1, -1] + [-1, -1, 0, 1, -1, -1, -1]
                                         + [-1] * 3 + [0, 1, -1, -1] + [-1] * 9)
    # Nothing is predicted across documents or from padding.
    ends = [8, 15, 22]
    for key in ("text_mask", "image_mask"):
        assert row[key][ends].sum() == 0 and row[key][23:].sum() == 0
    assert not row["tokens"][23:].any() and not row["modality"][23:].any() and not row["codes"][23:].any()
    assert row["text_mask"].dtype == np.float32 and row["tokens"].dtype == np.int32
    with pytest.raises(ValueError, match="longer than seq_len"):
        packing.pack_documents([_doc("t2i")], 8, D)
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_documents(docs, 20, D)
    with pytest.raises(ValueError, match="dimension"):
        packing.pack_documents(docs, 32, D + 1)


def test_bad_document_arguments():
    with pytest.raises(ValueError, match="direction"):
        _doc("x2y")
    with pytest.raises(ValueError, match="t2i"):
        _doc("i2t", drop=True)
    with pytest.raises(ValueError, match="codes"):
        packing.build_document([1], np.array([1, 2]), TABLE[:3], "t2i", SP)


def _examples(n, max_caption=4, n_image=3):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        length = int(rng.integers(1, max_caption + 1))
        ids = np.zeros(max_caption, np.int32)
        ids[:length] = rng.integers(10, 30, length)
        rows.append({"caption_ids": ids, "caption_len": np.int32(length),
                     "image_indices": rng.integers(0, 64, n_image).astype(np.int32)})
    return grain.MapDataset.source(rows)


def test_packed_dataset_random_access_and_directions():
    examples = _examples(11)
    kwargs = dict(seq_len=24, special=SP, t2i_prob=0.5, caption_dropout=0.5, seed=7)
    packed = packing.PackedDataset(examples, index_to_code=TABLE, **kwargs)
    assert packed.max_doc_len == 4 + 3 + 4 and packed.docs_per_row == 2 and len(packed) == 6
    row = packed[1]
    assert row["tokens"].shape == (24,) and row["codes"].shape == (24, D)
    assert set(row["segment_ids"].tolist()) <= {0, 1, 2} and packed[5]["segment_ids"].max() == 1  # last row: 1 doc
    # Deterministic and random access; callable lookup gives the same rows as a table.
    by_fn = packing.PackedDataset(examples, index_to_code=lambda idx: TABLE[idx], **kwargs)
    for r in (4, 1, 0):
        for key in packing.PACKED_KEYS:
            np.testing.assert_array_equal(packed[r][key], by_fn[r][key])
    # Each document carries its own example's tokens in the drawn direction.
    assert packed.group_documents == 2  # a row of 2 documents is one direction group
    for i in range(11):
        direction, drop = packing.draw_direction(7, i, 0.5, 0.5, packed.group_documents)
        example = examples[i]
        expect = packing.build_document(example["caption_ids"][: example["caption_len"]], example["image_indices"],
                                        TABLE[example["image_indices"]], direction, SP, drop_caption=drop)
        row = packed[i // 2]
        seg = row["segment_ids"] == i % 2 + 1
        np.testing.assert_array_equal(row["tokens"][seg], expect["tokens"])
    draws = [packing.draw_direction(7, i, 0.5, 0.5) for i in range(400)]
    t2i = [d for d in draws if d[0] == "t2i"]
    assert 150 < len(t2i) < 250 and 50 < sum(d[1] for d in t2i) < 150 and not any(d[1] for d in draws if d[0] == "i2t")
    assert all(packing.draw_direction(0, i, 1.0, 0.0) == ("t2i", False) for i in range(20))
    assert all(packing.draw_direction(0, i, 0.0, 1.0) == ("i2t", False) for i in range(20))


def test_packed_dataset_errors_and_grain_batching():
    with pytest.raises(ValueError, match="longer than seq_len=10"):
        packing.PackedDataset(_examples(4), seq_len=10, special=SP, index_to_code=TABLE, t2i_prob=0.5,
                              caption_dropout=0.1, seed=0)
    with pytest.raises(ValueError, match="t2i_prob"):
        packing.PackedDataset(_examples(4), seq_len=64, special=SP, index_to_code=TABLE, t2i_prob=1.5,
                              caption_dropout=0.1, seed=0)
    packed = packing.PackedDataset(_examples(12), seq_len=33, special=SP, index_to_code=TABLE, t2i_prob=0.7,
                                   caption_dropout=0.1, seed=0)
    it = iter(packed.shuffle(seed=0).repeat(None).batch(2).to_iter_dataset())
    batch = next(it)
    assert batch["tokens"].shape == (2, 33) and batch["code_targets"].shape == (2, 33, D)
    state = it.get_state()
    after = [next(it)["tokens"] for _ in range(3)]
    it.set_state(state)
    assert all(np.array_equal(a, next(it)["tokens"]) for a in after)


def test_directions_are_stratified_over_groups():
    """A group of n documents holds floor or ceil(t2i_prob x n) text->image documents, at random
    places, with mean share t2i_prob; an integral t2i_prob x n is exact despite float rounding."""
    def group_counts(p, n, groups=400):
        t2i = np.array([[packing.draw_direction(5, g * n + j, p, 0.0, n)[0] == "t2i"
                         for j in range(n)] for g in range(groups)])
        return t2i.sum(1), t2i
    counts, t2i = group_counts(0.7, 4)
    assert set(counts.tolist()) == {2, 3} and abs(counts.mean() / 4 - 0.7) < 0.03
    assert t2i.mean(0).min() > 0.6  # every place in a group is text->image about as often
    assert set(group_counts(0.7, 10, 50)[0].tolist()) == {7}  # 0.7 * 10 = 7.000000000000001
    assert packing.t2i_split(0.7, 10) == (7, 0.0) and packing.group_image_targets(0.7, 10, 3) == 21
    assert set(group_counts(1.0, 3, 20)[0].tolist()) == {3}
    assert set(group_counts(0.0, 3, 20)[0].tolist()) == {0}
    drops = [packing.draw_direction(5, i, 0.7, 0.5, 4) for i in range(800)]
    assert not any(d for direction, d in drops if direction == "i2t")
    assert 0.4 < np.mean([d for direction, d in drops if direction == "t2i"]) < 0.6
