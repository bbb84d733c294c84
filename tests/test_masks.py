"""Attention masks vs a brute-force double loop on random packed layouts (built by hand after
docs/INTERFACES.md, independent of the packer), decode masks vs the training mask, and the
no-peeking property: a position carrying a loss never sees its target (or anything after it)."""
import numpy as np
import pytest

from mmjax.models import masks


def build_row(docs, length, boi_in_block=False):
    """Packs documents into one row; returns dict of [L] arrays (segment_ids, image_block,
    modality, text_mask, image_mask). docs: ("t2i"|"i2t", caption_len, image_len)."""
    seg, blk, mod, gen_img = [], [], [], []
    n_blocks = 0
    for d, (kind, n_cap, n_img) in enumerate(docs, start=1):
        if kind == "t2i":  # <bos> caption <boi> img.. <eoi> <eos>
            kinds = ["t"] * (1 + n_cap + 1) + ["i"] * n_img + ["t", "t"]
            blocks = [0] * len(kinds)
            gen = [k == "i" for k in kinds]
        else:  # <bos> <boi> img.. <eoi> caption <eos>: the image is context
            n_blocks += 1
            kinds = ["t", "t"] + ["i"] * n_img + ["t"] * (1 + n_cap + 1)
            blocks = [0, n_blocks if boi_in_block else 0] + [n_blocks] * n_img + [0] * (n_cap + 2)
            gen = [False] * len(kinds)
        seg += [d] * len(kinds)
        blk += blocks
        mod += [int(k == "i") for k in kinds]
        gen_img += gen
    assert len(seg) <= length, "layout too long for the row"
    pad = length - len(seg)
    seg, blk, mod, gen_img = (np.array(a + [0] * pad) for a in (seg, blk, mod, gen_img))
    nxt_same_doc = np.zeros(length, bool)
    nxt_same_doc[:-1] = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    nxt_mod = np.append(mod[1:], 0)
    nxt_gen = np.append(gen_img[1:], False)
    text_mask = (nxt_same_doc & (nxt_mod == 0)).astype(np.float32)
    image_mask = (nxt_same_doc & nxt_gen).astype(np.float32)
    return dict(segment_ids=seg, image_block=blk, modality=mod, text_mask=text_mask,
                image_mask=image_mask)


def random_batch(rng, batch, length, boi_in_block=False):
    rows = []
    for _ in range(batch):
        docs, used = [], 0
        while True:
            kind = "t2i" if rng.random() < 0.5 else "i2t"
            n_cap, n_img = int(rng.integers(0, 4)), int(rng.integers(1, 6))
            size = n_cap + n_img + 4
            if used + size > length:
                break
            docs.append((kind, n_cap, n_img))
            used += size
        rows.append(build_row(docs, length, boi_in_block))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def brute_force(seg, blk, bidirectional):
    b, n = seg.shape
    out = np.zeros((b, n, n), bool)
    for r in range(b):
        for q in range(n):
            for k in range(n):
                same = seg[r, q] == seg[r, k] and seg[r, q] > 0
                block = blk[r, q] == blk[r, k] and blk[r, q] > 0 and bidirectional
                out[r, q, k] = (same and (k <= q or block)) or k == q
    return out


@pytest.mark.parametrize("boi_in_block", [False, True])
def test_training_and_decode_masks_match_brute_force(boi_in_block):
    rng = np.random.default_rng(int(boi_in_block))
    b, n = 4, 24
    batch = random_batch(rng, b, n, boi_in_block)
    assert batch["image_block"].max() > 0 and (batch["segment_ids"] == 0).any()
    for bidirectional in (False, True):
        want = brute_force(batch["segment_ids"], batch["image_block"], bidirectional)
        got = np.asarray(masks.attention_mask(batch["segment_ids"], batch["image_block"],
                                              bidirectional))
        np.testing.assert_array_equal(got, want)
        if bidirectional:  # the layouts do exercise the bidirectional part
            assert (want & ~np.tril(np.ones((n, n), bool))).any()
        # Decode: a chunk at slots [start, start+T) against a cache holding slots < start+T.
        for start, chunk in ((0, 7), (7, 1), (8, 16), (23, 1)):
            end = start + chunk
            cache_seg = np.where(np.arange(n) < end, batch["segment_ids"], 0)
            cache_blk = np.where(np.arange(n) < end, batch["image_block"], 0)
            want_dec = brute_force(cache_seg, cache_blk, bidirectional)[:, start:end]
            got_dec = np.asarray(masks.decode_attention_mask(
                batch["segment_ids"][:, start:end], batch["image_block"][:, start:end], start,
                cache_seg, cache_blk, bidirectional))
            np.testing.assert_array_equal(got_dec, want_dec)


def test_loss_positions_never_see_their_targets():
    rng = np.random.default_rng(3)
    for boi_in_block in (False, True):
        batch = random_batch(rng, 6, 32, boi_in_block)
        mask = np.asarray(masks.attention_mask(batch["segment_ids"], batch["image_block"], True))
        loss = (batch["text_mask"] + batch["image_mask"]) > 0
        assert loss.sum() > 20 and batch["image_mask"].sum() > 0
        later = np.triu(np.ones(mask.shape[1:], bool), k=1)
        for r, i in zip(*np.nonzero(loss)):
            assert not mask[r, i, i + 1], f"row {r} position {i} sees its target"
            assert not (mask[r, i] & later[i]).any(), f"row {r} position {i} sees the future"
        # ...whereas a context image's tokens do see later tokens of their block.
        r, i = next(zip(*np.nonzero(batch["image_block"] > 0)))
        assert mask[r, i, i + 1]


def test_padding_attends_only_to_itself_and_bad_shapes_fail():
    batch = build_row([("t2i", 2, 3)], 16)
    seg, blk = batch["segment_ids"][None], batch["image_block"][None]
    mask = np.asarray(masks.attention_mask(seg, blk, True))[0]
    pad = np.nonzero(seg[0] == 0)[0]
    np.testing.assert_array_equal(mask[pad][:, pad], np.eye(len(pad), dtype=bool))
    assert not mask[pad][:, seg[0] > 0].any() and not mask[seg[0] > 0][:, pad].any()
    with pytest.raises(ValueError, match="batch, length"):
        masks.attention_mask(seg, blk[:, :-1], True)


def packed_batch(rows, length, vocab=50, levels=(8, 5, 5, 5), seed=0, boi_in_block=False):
    """A full packed batch (all keys of docs/INTERFACES.md) for model tests: rows is a list of
    document lists as in `build_row`; token ids and FSQ codes are random."""
    from mmjax.tokenizers.fsq import FSQ
    fsq = FSQ(tuple(levels))
    rng = np.random.default_rng(seed)
    out = [build_row(docs, length, boi_in_block) for docs in rows]
    b = {k: np.stack([r[k] for r in out]) for k in out[0]}
    seg, mod = b["segment_ids"], b["modality"]
    positions = np.zeros_like(seg)
    for r in range(len(rows)):
        for i in range(1, length):
            positions[r, i] = positions[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
    positions[seg == 0] = 0
    text = rng.integers(1, vocab, seg.shape)
    index = rng.integers(0, fsq.codebook_size, seg.shape)
    tokens = np.where(seg == 0, 0, np.where(mod == 1, index, text)).astype(np.int32)
    codes = np.where((mod == 1)[..., None], fsq.indices_to_codes(index), 0.0).astype(np.float32)
    nxt = lambda a: np.concatenate([a[:, 1:], np.zeros_like(a[:, :1])], 1)  # noqa: E731
    b.update(tokens=tokens, codes=codes, positions=positions.astype(np.int32),
             text_targets=np.where(b["text_mask"] > 0, nxt(tokens), 0).astype(np.int32),
             code_targets=np.where(b["image_mask"][..., None] > 0, nxt(codes), 0.0),
             index_targets=np.where(b["image_mask"] > 0, nxt(tokens), 0).astype(np.int32))
    b["code_targets"] = b["code_targets"].astype(np.float32)
    for k in ("segment_ids", "image_block", "modality"):
        b[k] = b[k].astype(np.int32)
    return b


def with_image_pos(batch):
    """The packer's `image_pos`: each image token's index inside its (contiguous) image run."""
    mod = np.asarray(batch["modality"])
    pos = np.full(mod.shape, -1, np.int32)
    for r in range(mod.shape[0]):
        for i in range(mod.shape[1]):
            if mod[r, i] == 1:
                pos[r, i] = pos[r, i - 1] + 1 if i and mod[r, i - 1] == 1 else 0
    return dict(batch, image_pos=pos)
