"""First-fit packing (data.packing="first_fit"): every example packed exactly once, every group
within the bounds the MoT buckets and the heads are sized from, rows a pure function of their
index, and the model's shared-group buckets equal to the per-token reference."""
import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mot_shapes
from mmjax import config_validation, objectives, targets
from mmjax.data import first_fit, packing
from mmjax.models import mot
from mmjax.models.model import MultimodalLM
from mmjax.tasks.multimodal import MultimodalTask
from mmjax.tokenizers.fsq import FSQ
from test_masks import packed_batch
from test_mot import build, tiny_cfg
from test_packing import SP, TABLE, _examples

N_IMAGE = 3


def _plan(lengths, t2i, **kw):
    args = dict(seq_len=24, group_rows=2, num_image_tokens=N_IMAGE, image_slots=8, t2i_cap=3,
                lookahead=4)
    args.update(kw)
    return first_fit.plan_rows(lengths, t2i, **args), args


@pytest.mark.parametrize("lookahead", [0, 4])
def test_plan_packs_every_document_once_within_every_bound(lookahead):
    rng = np.random.default_rng(0)
    lengths = rng.integers(N_IMAGE + 4, 16, 300)
    t2i = rng.random(300) < 0.7
    (starts, examples), a = _plan(lengths, t2i, lookahead=lookahead)
    assert sorted(examples.tolist()) == list(range(300))
    rows = [examples[starts[r]:starts[r + 1]] for r in range(len(starts) - 1)]
    assert len(rows) % a["group_rows"] == 0
    assert max(lengths[r].sum() for r in rows) <= a["seq_len"]
    for g in range(0, len(rows), a["group_rows"]):
        docs = np.concatenate(rows[g:g + a["group_rows"]])
        assert len(docs) * N_IMAGE <= a["group_rows"] * a["image_slots"]
        assert (lengths[docs] - N_IMAGE).sum() <= a["group_rows"] * (a["seq_len"] - a["image_slots"])
        assert t2i[docs].sum() <= a["t2i_cap"]
    # Fuller rows than the fixed packer's seq_len // longest = 1 document per row.
    assert lengths.sum() / (len(rows) * a["seq_len"]) > 1.3 * lengths.mean() / a["seq_len"]


def test_plan_passes_over_what_breaks_a_bound_and_keeps_it_for_the_next_group():
    # Three text->image documents with a cap of 2: the third waits for the next group, and the
    # short i2t document behind it still joins the first group.
    lengths = np.array([8, 8, 8, 7])
    t2i = np.array([True, True, True, False])
    (starts, examples), _ = _plan(lengths, t2i, t2i_cap=2, image_slots=12)
    rows = [examples[starts[r]:starts[r + 1]].tolist() for r in range(len(starts) - 1)]
    assert rows == [[0, 1, 3], [], [2], []]
    with pytest.raises(ValueError, match="does not fit"):
        _plan(np.array([25]), np.array([True]))


def test_bounds_and_defaults():
    assert first_fit.default_image_slots(96, 28, 16) == 45  # 96 x 16 / (14 + 16 + 4)
    assert first_fit.t2i_per_group(0.7, 4, 44, 16) == 8  # ceil(0.7 x 11)
    # k documents: min(k x 31, 96 - 17 k) text targets, largest at k = 2
    assert first_fit.row_text_targets(96, 28, 16) == 62
    with pytest.raises(ValueError, match="row_image_slots=70"):
        first_fit.check_image_slots(96, 28, 16, 70)  # leaves 26 text slots for a 32-token caption part
    with pytest.raises(ValueError, match="longer than seq_len"):
        first_fit.check_image_slots(40, 28, 16, 16)


def test_draw_directions_equal_the_one_by_one_draws():
    t2i, drop = packing.draw_directions(3, np.arange(60), 0.7, 0.3, 8)
    one = [packing.draw_direction(3, i, 0.7, 0.3, 8) for i in range(60)]
    assert t2i.tolist() == [d == "t2i" for d, _ in one]
    assert drop.tolist() == [d for _, d in one]


def _first_fit(examples, **kw):
    args = dict(seq_len=24, special=SP, index_to_code=TABLE, t2i_prob=0.7, caption_dropout=0.3,
                seed=5, group_rows=2, packing="first_fit", image_slots=9, lookahead=3)
    args.update(kw)
    return packing.PackedDataset(examples, **args)


def test_first_fit_rows_hold_each_example_once_as_its_document():
    examples = _examples(40, max_caption=6)
    packed = _first_fit(examples)
    fixed = packing.PackedDataset(examples, seq_len=24, special=SP, index_to_code=TABLE,
                                  t2i_prob=0.7, caption_dropout=0.3, seed=5, group_rows=2)
    assert len(packed) < len(fixed) and len(packed) % 2 == 0
    seen = []
    for r in range(len(packed)):
        row = packed[r]
        for seg, example in enumerate(packed.row_examples(r), start=1):
            direction, drop = packing.draw_direction(5, example, 0.7, 0.3, packed.group_documents)
            e = examples[int(example)]
            want = packing.build_document(e["caption_ids"][:e["caption_len"]], e["image_indices"],
                                          TABLE[e["image_indices"]], direction, SP, drop_caption=drop)
            np.testing.assert_array_equal(row["tokens"][row["segment_ids"] == seg], want["tokens"])
            seen.append(int(example))
    assert sorted(seen) == list(range(40))
    slots = np.concatenate([packed[r]["segment_ids"] for r in range(len(packed))])
    fixed_slots = np.concatenate([fixed[r]["segment_ids"] for r in range(len(fixed))])
    assert packed.fill == pytest.approx({"real_fraction": np.mean(slots > 0),
                                         "fixed_real_fraction": np.mean(fixed_slots > 0),
                                         "documents_per_row": 40 / len(packed)})
    assert fixed.fill is None
    # A pure function of the index: a second dataset (caption lengths given, not read) agrees.
    lengths = np.array([int(examples[i]["caption_len"]) for i in range(40)])
    again = _first_fit(examples, caption_lengths=lengths)
    for r in (3, 0, len(packed) - 1):
        for key in packing.PACKED_KEYS:
            np.testing.assert_array_equal(packed[r][key], again[r][key])


def test_first_fit_rows_fit_the_heads_and_buckets_they_declare():
    packed = _first_fit(_examples(60, max_caption=6))
    image_cap, text_cap = packed.target_capacity
    assert packed.image_capacity == 9 and packed.bucket_rows == 2
    rows = [packed[r] for r in range(len(packed))]
    batch = {k: np.stack([r[k] for r in rows]) for k in ("image_mask", "text_mask", "modality",
                                                         "segment_ids")}
    targets.select(batch["image_mask"], image_cap, "image", group=2)  # raises past the capacity
    targets.select(batch["text_mask"], text_cap, "text")
    routing = mot.make_bucket_routing(jnp.asarray(batch["modality"]),
                                      jnp.asarray(batch["segment_ids"] > 0), 9,
                                      mot.bucket_blocks(len(rows), 2, 1))
    assert not bool(routing.overflow.any())
    with pytest.raises(ValueError, match="row_image_slots=2"):
        _first_fit(_examples(4), image_slots=2)


def test_buckets_shared_by_a_group_equal_the_reference_and_keep_groups_whole():
    # Row 0 holds 14 image tokens, row 1 holds 3 (and 16 text): over per-row buckets of 9 image
    # and 15 text slots, within two rows' 18 and 30.
    rows = [[("t2i", 1, 8), ("i2t", 1, 6)], [("i2t", 6, 2), ("t2i", 5, 1)]]
    batch = packed_batch(rows, 24)
    real = batch["segment_ids"] > 0
    model, params = build(tiny_cfg(num_modalities=2, mot_impl="tiled", mot_tile=4), batch)
    shared = MultimodalLM(dataclasses.replace(
        tiny_cfg(9, num_modalities=2, mot_impl="buckets"), bucket_rows=2))
    got, want = (jax.jit(m.apply)({"params": params}, batch) for m in (shared, model))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-4, atol=1e-4)
    assert shared.mot_impl_for(1, 24) != "buckets"  # a lone row (e.g. an init batch) is no group
    # On two data shards (one row each) per-row buckets overflow; a group's rows stay together.
    modality, real = jnp.asarray(batch["modality"]), jnp.asarray(real)
    per_row = mot.make_bucket_routing(modality, real, 9, mot.bucket_blocks(2, 1, shards=2))
    shared_rows = mot.make_bucket_routing(modality, real, 9, mot.bucket_blocks(2, 2, shards=2))
    assert per_row.overflow.all() and not shared_rows.overflow.any()  # row 1: too much text
    assert mot.bucket_blocks(8, 2, 2) == 2  # 4 rows per shard: whole groups
    assert mot.bucket_blocks(8, 4, 4) == 2  # 2 rows per shard split a group: one block per group
    with pytest.raises(ValueError, match="direction_group_rows"):
        mot.bucket_blocks(6, 4, 1)


def test_config_fields():
    c = mot_shapes.get_config("smoke")
    c.data.packing = "first_fit"
    c.data.row_image_slots = 0
    config_validation.validate(c)
    cfg = config_validation.model_config(c, 64)
    side = config_validation.image_side(c)
    assert cfg.bucket_rows == config_validation.direction_group_rows(c) and cfg.image_capacity == \
        first_fit.default_image_slots(c.model.max_seq_len, c.data.max_caption_len, side * side)
    cap = config_validation.target_capacity(c)
    assert cap.group == cfg.bucket_rows and cap.image % (side * side) == 0
    c.data.row_image_slots = c.model.max_seq_len
    with pytest.raises(config_validation.ConfigError, match="data.row_image_slots"):
        config_validation.validate(c)
    c.data.packing = "tight"
    with pytest.raises(config_validation.ConfigError, match="data.packing"):
        config_validation.validate(c)


def test_a_smoke_configs_loss_on_first_fit_rows_equals_the_reference():
    """The config's typed blocks (buckets shared by a group, head capacities per group and row)
    run first-fit rows: the loss equals tiled MoT with the heads at every position."""
    c = mot_shapes.get_config("smoke,grid4")  # 16 image tokens: several documents per row
    c.data.packing = "first_fit"
    c.train.batch_size = 4
    side = config_validation.image_side(c)
    fsq = FSQ(tuple(c.fsq.levels))
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(48):
        length = int(rng.integers(1, c.data.max_caption_len + 1))
        ids = np.zeros(c.data.max_caption_len, np.int32)
        ids[:length] = rng.integers(10, 60, length)
        rows.append({"caption_ids": ids, "caption_len": np.int32(length),
                     "image_indices": rng.integers(0, fsq.codebook_size, side * side).astype(np.int32)})
    task = MultimodalTask(c, 64)
    packed = packing.PackedDataset(
        grain.MapDataset.source(rows), seq_len=c.model.max_seq_len, special=SP,
        index_to_code=fsq.indices_to_codes, t2i_prob=c.objective.t2i_prob, caption_dropout=0.1,
        seed=0, group_rows=task.capacity.group, packing="first_fit",
        image_slots=task.model.cfg.image_capacity)
    assert packed.bucket_rows == task.model.cfg.bucket_rows == c.objective.direction_group_rows
    assert np.mean([packed[r]["segment_ids"].max() for r in range(4)]) > 1
    batch = {k: jnp.asarray(np.stack([packed[r][k] for r in range(4)])) for k in packing.PACKED_KEYS}
    c.model.mot_impl = "tiled"
    reference = MultimodalTask(c, 64)
    params = task.init_params(jax.random.key(0), batch)
    assert task.model.mot_impl_for(4, c.model.max_seq_len) == "buckets"
    got, _ = jax.jit(lambda p: task.loss_fn(p, batch, jax.random.key(1), False))(params)
    want, _ = objectives.compute_losses(reference.model, params, batch, jax.random.key(1),
                                        reference.objective, train=False, capacity=None)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
