"""Edit-document packer: layout and loss masks against a hand-built reference, attention masks
against the brute-force rule of docs/INTERFACES.md, and no loss position sees its target."""
import grain
import numpy as np
import pytest

from mmjax.data import edit_packing, packing
from mmjax.data.shapes_edits import CHAIN_EDITS, CHAIN_IMAGES
from mmjax.models import masks

SP = packing.SpecialIds(bos=2, eos=3, boi=4, eoi=5, uncond=6)
D = 3
TABLE = np.random.default_rng(0).uniform(-1, 1, (64, D)).astype(np.float32)


def reference(instr_lens, n_img):
    """Per token, written from the layout description alone: (kind, image number or -1,
    is instruction). <bos> <boi> A <eoi> (instr <boi> IMG <eoi>)* <eos>."""
    toks = [("t", -1, False), ("t", -1, False)] + [("i", 0, False)] * n_img + [("t", -1, False)]
    for j, length in enumerate(instr_lens, start=1):
        toks += [("t", -1, True)] * length + [("t", -1, False)] + [("i", j, False)] * n_img
        toks += [("t", -1, False)]
    return toks + [("t", -1, False)]


def _doc(instrs, n_img=3, drop=None):
    rng = np.random.default_rng(len(instrs))
    images = [rng.integers(0, 64, n_img) for _ in range(len(instrs) + 1)]
    return images, edit_packing.build_edit_document(images, [TABLE[i] for i in images], instrs, SP,
                                                    drop=drop)


@pytest.mark.parametrize("instrs", [[[10, 11]], [[10], [12, 13, 14]], [[10, 11], [12], [13]]])
def test_document_layout_and_loss_masks_match_reference(instrs):
    images, doc = _doc(instrs)
    ref = reference([len(t) for t in instrs], 3)
    assert len(doc["tokens"]) == len(ref)
    want_tokens = [SP.bos, SP.boi, *images[0], SP.eoi]
    for text, image in zip(instrs, images[1:]):
        want_tokens += [*text, SP.boi, *image, SP.eoi]
    np.testing.assert_array_equal(doc["tokens"], want_tokens + [SP.eos])
    kind = np.array([k == "i" for k, _, _ in ref])
    img = np.array([i for _, i, _ in ref])
    instr = np.array([s for _, _, s in ref])
    np.testing.assert_array_equal(doc["modality"], kind.astype(int))
    np.testing.assert_array_equal(doc["image_block"], (img == 0).astype(int))  # A only: context
    # Position i predicts i+1: image loss exactly where i+1 is a token of an image after an
    # instruction; text loss where i+1 is text but not instruction text; never at the end.
    nxt = lambda a: np.append(a[1:], a[0] * 0)  # noqa: E731
    np.testing.assert_array_equal(doc["image_mask"], nxt(img >= 1).astype(np.float32))
    want_text = nxt(~kind & ~instr).astype(np.float32)
    want_text[-1] = 0
    np.testing.assert_array_equal(doc["text_mask"], want_text)
    np.testing.assert_array_equal(doc["text_targets"], np.where(want_text > 0, nxt(doc["tokens"]), 0))
    gen = doc["image_mask"] > 0
    np.testing.assert_array_equal(doc["code_targets"][gen], doc["codes"][1:][gen[:-1]])
    np.testing.assert_array_equal(doc["image_pos"][kind], np.tile(np.arange(3), len(images)))
    assert len(doc["tokens"]) == packing.layout.edit_document_length([len(t) for t in instrs], 3)


def test_dropped_instruction_is_uncond():
    _, doc = _doc([[10, 11], [12]], drop=[True, False])
    assert list(doc["tokens"][6:8]) == [SP.uncond, SP.boi] and 12 in doc["tokens"]


def _chains(n, max_text=4, n_img=3):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        lengths = rng.integers(1, max_text + 1, CHAIN_IMAGES).astype(np.int32)
        ids = np.zeros((CHAIN_IMAGES, max_text), np.int32)
        for k, length in enumerate(lengths):
            ids[k, :length] = rng.integers(10, 40, length)
        out.append({"caption_ids": ids, "caption_len": lengths,
                    "image_indices": rng.integers(0, 64, (CHAIN_IMAGES, n_img)).astype(np.int32)})
    return grain.MapDataset.source(out)


def _packed(seq_len=96, **kw):
    kw = dict(dict(chain_prob=0.5, dropout=0.0, seed=0), **kw)
    return edit_packing.EditPackedDataset(_chains(24), seq_len=seq_len, special=SP,
                                          index_to_code=TABLE, **kw)


def brute_force(seg, blk, bidirectional):
    """allowed(q, k) of docs/INTERFACES.md as a double loop."""
    n = len(seg)
    out = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(n):
            same = seg[q] == seg[k] > 0
            block = blk[q] == blk[k] > 0 and bidirectional
            out[q, k] = (same and (k <= q or block)) or k == q
    return out


def test_packed_rows_masks_and_no_peeking():
    ds = _packed()
    assert ds.docs_per_row == 96 // ds.max_doc_len >= 2
    rows = [ds[i] for i in range(len(ds))]
    edits_seen = set()
    for row in rows:
        seg, blk = row["segment_ids"], row["image_block"]
        for s in set(seg[seg > 0].tolist()):  # one context block per document, id = segment
            assert set(blk[(seg == s) & (blk > 0)].tolist()) == {s}
            edits_seen.add(int(np.sum((row["modality"] == 1) & (seg == s))) // 3 - 1)
        for bidirectional in (False, True):
            want = brute_force(seg, blk, bidirectional)
            got = np.asarray(masks.attention_mask(seg[None], blk[None], bidirectional))[0]
            np.testing.assert_array_equal(got, want)
        mask = brute_force(seg, blk, True)
        loss = (row["text_mask"] + row["image_mask"]) > 0
        later = np.triu(np.ones(mask.shape, bool), k=1)
        for i in np.nonzero(loss)[0]:
            assert not (mask[i] & later[i]).any(), f"position {i} sees its target or later"
        # generated images are causal; a context image sees forward inside its block
        i = int(np.nonzero(blk > 0)[0][0])
        assert mask[i, i + 1]
        gen = np.nonzero(row["image_mask"] > 0)[0] + 1
        assert not (mask[gen[0]] & later[gen[0]]).any()
    assert edits_seen == set(range(1, CHAIN_EDITS + 1))


def test_random_access_windows_and_errors():
    ds = _packed()
    np.testing.assert_array_equal(ds[3]["tokens"], ds[3]["tokens"])
    np.testing.assert_array_equal(_packed()[3]["tokens"], ds[3]["tokens"])
    single = _packed(chain_prob=0.0)
    assert single.max_doc_len < ds.max_doc_len
    first = _packed(window=(0, 1))
    doc = first.document(0)
    chain = _chains(24)[0]
    np.testing.assert_array_equal(doc["tokens"][2:5], chain["image_indices"][0])
    assert list(doc["tokens"][6:6 + chain["caption_len"][1]]) == list(
        chain["caption_ids"][1, :chain["caption_len"][1]])
    dropped = _packed(dropout=1.0).document(0)
    assert SP.uncond in dropped["tokens"]
    with pytest.raises(ValueError, match="max_seq_len"):
        _packed(seq_len=30)
    with pytest.raises(ValueError, match="window"):
        _packed(window=(2, 2))


@pytest.mark.parametrize("seq_len", [40, 96, 150])
def test_target_capacity_bounds_every_row_of_every_window(seq_len):
    """The heads' static capacity (edit_packing.row_target_capacity) holds for training's mixed
    chains and for each fixed evaluation window (shorter documents pack more per row)."""
    cap_image, cap_text = edit_packing.row_target_capacity(seq_len, 4, 3)
    most_image = 0
    for kw in (dict(chain_prob=0.0), dict(chain_prob=1.0), dict(chain_prob=0.5, dropout=0.5),
               *(dict(window=(0, e)) for e in range(1, CHAIN_EDITS + 1))):
        try:
            ds = _packed(seq_len, **kw)
        except ValueError:  # a 3-edit document longer than seq_len: that window is not packable
            continue
        assert ds.target_capacity == (cap_image, cap_text)
        for row in (ds[i] for i in range(len(ds))):
            assert row["image_mask"].sum() <= cap_image and row["text_mask"].sum() <= cap_text
            most_image = max(most_image, int(row["image_mask"].sum()))
    assert most_image == cap_image  # reached by the densest window


def test_target_capacity_from_an_edits_config():
    from mmjax import config_defaults, config_validation, targets
    config = config_defaults.base_config()
    config.data.name, config.data.max_caption_len, config.model.max_seq_len = "shapes_edits", 4, 96
    config.data.image_size, config.fsq.channels = 8, (8, 16)  # 4 x 4 = 16 image tokens
    image, text = edit_packing.row_target_capacity(96, 4, 16)
    assert config_validation.target_capacity(config) == targets.TargetCapacity(image, text)
    assert (image, text) != packing.row_target_capacity(96, 4, 16)  # not the pairs' layout
