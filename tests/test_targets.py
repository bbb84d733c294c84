"""Heads only where their targets are (mmjax/targets.py): the packer's static capacity bounds every
packed row and is reached; `select` gathers targets in order with their weights; the gathered
losses and gradients equal the all-positions masked ones (text, flow with K samples, discrete,
including a row with no targets and padding); a row over capacity raises naming the config fields
and gives a NaN loss under jit."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_defaults, config_validation, objectives, targets
from mmjax.data import packing
from test_masks import packed_batch
from test_mot import LEVELS, VOCAB, build, key, tiny_cfg

SP = packing.SpecialIds(bos=2, eos=3, boi=4, eoi=5, uncond=6)
# Row 0: t2i + i2t documents; row 1: one t2i document and padding; row 2: padding only (no
# targets at all); row 3: an i2t document (text targets only) and padding.
ROWS = [[("t2i", 3, 6), ("i2t", 2, 4)], [("t2i", 1, 8)], [], [("i2t", 4, 5)]]
L = 24


def _examples(n, max_caption, n_image, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(0, max_caption + 1))  # empty captions too
        ids = np.zeros(max_caption, np.int32)
        ids[:length] = rng.integers(10, 30, length)
        out.append({"caption_ids": ids, "caption_len": np.int32(length),
                    "image_indices": rng.integers(0, 16, n_image).astype(np.int32)})
    return grain.MapDataset.source(out)


@pytest.mark.parametrize("seq_len,max_caption,n_image", [(24, 4, 3), (40, 5, 9), (33, 0, 4)])
@pytest.mark.parametrize("group_rows", [1, 3])
def test_capacity_bounds_every_packed_row_and_is_reached(seq_len, max_caption, n_image,
                                                         group_rows):
    """Text targets are bounded per row, image targets per direction group of `group_rows` rows
    (ceil(t2i_prob x the group's documents) images), and both bounds are reached."""
    table = np.random.default_rng(0).uniform(-1, 1, (16, 2)).astype(np.float32)
    cap_row_image, cap_text = packing.row_target_capacity(seq_len, max_caption, n_image)
    docs = cap_row_image // n_image * group_rows
    most_text = 0
    for t2i_prob, dropout in ((1.0, 0.0), (0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.7, 0.1)):
        ds = packing.PackedDataset(_examples(60, max_caption, n_image), seq_len=seq_len,
                                   special=SP, index_to_code=table, t2i_prob=t2i_prob,
                                   caption_dropout=dropout, seed=3, group_rows=group_rows)
        cap_image = packing.group_image_targets(t2i_prob, docs, n_image)
        assert cap_image == -(-round(t2i_prob * docs, 9) // 1) * n_image
        assert ds.target_capacity == (cap_image, cap_text)
        assert ds.image_capacity == packing.row_image_capacity(seq_len, max_caption, n_image)
        rows = [ds[i] for i in range(len(ds))]
        for row in rows:
            most_text = max(most_text, row["text_mask"].sum())
            assert row["text_mask"].sum() <= cap_text
            assert_fits_mot_buckets(row, ds.image_capacity)
        images = [sum(r["image_mask"].sum() for r in rows[g:g + group_rows])
                  for g in range(0, len(rows), group_rows)]
        assert max(images) <= cap_image, (images, cap_image)
        assert max(images) == cap_image  # tight: a group reaches ceil(t2i_prob x documents)
    assert most_text == cap_text  # full captions (t2i_prob 0: the caption of every document)


def assert_fits_mot_buckets(row, image_capacity):
    """The MoT buckets' premise (mot.make_bucket_routing): a row's real image tokens fit the
    image bucket and its real text the rest of the row."""
    real = row["segment_ids"] > 0
    images = int(np.sum(real & (row["modality"] == 1)))
    text = int(np.sum(real & (row["modality"] == 0)))
    assert images <= image_capacity and text <= len(real) - image_capacity, (images, text)


def test_target_capacity_from_config():
    config = config_defaults.base_config()
    config.model.max_seq_len, config.data.max_caption_len = 96, 28
    config.data.image_size, config.fsq.channels = 32, (8, 16, 16)  # 8 x 8 = 64 image tokens
    assert config_validation.target_capacity(config) == targets.TargetCapacity(64, 31)
    config.model.max_seq_len = 2 * 96 + 10
    assert config_validation.target_capacity(config) == targets.TargetCapacity(128, 62)
    config.model.max_seq_len = 90
    with pytest.raises(config_validation.ConfigError, match="model.max_seq_len=90"):
        config_validation.target_capacity(config)


def test_direction_groups_from_config():
    """The demo's image capacity is per group of objective.direction_group_rows rows; a batch
    that is not whole groups is refused naming both fields; edit documents have no groups."""
    from configs import mot_shapes
    config = mot_shapes.get_config("demo,grid8")  # one 92-token document per 96-token row
    assert config_validation.target_capacity(config) == targets.TargetCapacity(192, 31, 4)
    config.objective.t2i_prob = 0.8  # 3.2 of 4 documents: room for 4
    assert config_validation.target_capacity(config) == targets.TargetCapacity(256, 31, 4)
    # grid4: 16-token images, 48-token documents, 2 per row under the fixed packer: a group of 4
    # rows holds 8 documents, 5.6 of them text->image, so room for 6 images of 16 targets; the
    # demo's first-fit groups admit 4 x 45 // 16 = 11 documents, so room for ceil(7.7) = 8
    grid4 = mot_shapes.get_config("demo")
    assert config_validation.target_capacity(grid4) == targets.TargetCapacity(128, 62, 4)
    grid4.data.packing = "fixed"
    assert config_validation.target_capacity(grid4) == targets.TargetCapacity(96, 62, 4)
    config.train.batch_size = 18
    with pytest.raises(config_validation.ConfigError,
                       match=r"train.batch_size=18: must be a multiple of "
                             r"objective.direction_group_rows=4"):
        config_validation.validate(config)
    edits = mot_shapes.get_config("demo,edits")
    edits.objective.direction_group_rows = 4  # batch 10: fine, edit documents draw no direction
    config_validation.validate(edits)
    assert config_validation.target_capacity(edits).group == 1


def test_select_gathers_targets_in_position_order_with_weights():
    mask = np.array([[0, 1, 0, 0.5, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], np.float32)
    s = jax.jit(lambda m: targets.select(m, 4, "image"))(mask)
    np.testing.assert_array_equal(s.index, [[1, 3, 4, 0], [0, 0, 0, 0], [0, 1, 2, 0]])
    np.testing.assert_array_equal(s.weight, [[1, 0.5, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    assert int(s.overflow) == 0
    x = np.arange(3 * 6 * 2).reshape(3, 6, 2)
    np.testing.assert_array_equal(s.take(x), x[np.arange(3)[:, None], np.asarray(s.index)])
    k = np.arange(5 * 3 * 6).reshape(5, 3, 6)  # [K, B, T] samples: positions on axis 2
    np.testing.assert_array_equal(s.take(k, axis=2), k[:, np.arange(3)[:, None], np.asarray(s.index)])
    assert int(jax.jit(lambda m: targets.select(m, 2, "image").overflow)(mask)) == 2  # 3 -> 2, 3 -> 2
    with pytest.raises(ValueError, match="3 text targets.*capacity 2.*data.max_caption_len"):
        targets.select(mask, 2, "text")


def _losses_and_grads(model, params, batch, objective, capacity):
    def f(p, b):
        return objectives.compute_losses(model, p, b, key(7), objective, train=True,
                                         capacity=capacity)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params, batch)  # batch traced, as in train


def test_grouped_select_gathers_each_group_of_rows_end_to_end():
    """group=2: rows (0, 1) and (2, 3) are laid end to end and gathered together; slot indices
    point into the [2 x T] group, and take() reads the same [B/2, C] slots of any [.., B, T, ..]."""
    mask = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]], np.float32)
    s = jax.jit(lambda m: targets.select(m, 3, "image", group=2))(mask)
    np.testing.assert_array_equal(s.index, [[1, 2, 3], [5, 0, 0]])
    np.testing.assert_array_equal(s.weight, [[1, 1, 1], [1, 0, 0]])
    x = np.arange(4 * 3 * 2).reshape(4, 3, 2)
    np.testing.assert_array_equal(s.take(x), [[x[0, 1], x[0, 2], x[1, 0]],
                                              [x[3, 2], x[2, 0], x[2, 0]]])
    k = np.arange(5 * 4 * 3).reshape(5, 4, 3)  # [K, B, T] samples
    np.testing.assert_array_equal(s.take(k, axis=2)[:, 0], k[:, [0, 0, 1], [1, 2, 0]])
    with pytest.raises(ValueError, match="a group of 2 packed rows holds 3 image targets"):
        targets.select(mask, 2, "image", group=2)
    with pytest.raises(ValueError, match="4 rows does not split into groups of 3"):
        targets.select(mask, 3, "image", group=3)


@pytest.mark.parametrize("head", [dict(flow_t_samples=3), dict(image_head="discrete"),
                                  dict(image_head="discrete", discrete_factorized=True)])
@pytest.mark.parametrize("group", [1, 2])
def test_gathered_losses_and_gradients_equal_all_positions(head, group):
    cfg = tiny_cfg(num_modalities=2, max_seq_len=L, noise_aug=0.1, **head)
    batch = packed_batch(ROWS, L, VOCAB, LEVELS, seed=4)
    model, params = build(cfg, batch)
    obj = config_defaults.objective_config()
    obj.update(text_weight=0.7, image_weight=1.3)
    objective = config_validation.objective_config(obj)
    per_group = batch["image_mask"].reshape(len(ROWS) // group, -1).sum(1)
    counts = (int(per_group.max()), int(batch["text_mask"].sum(1).max()))
    (ref_loss, ref_m), ref_g = _losses_and_grads(model, params, batch, objective, None)
    assert ref_m["image_tokens"] > 0 and ref_m["text_tokens"] > 0 and ref_loss > 0
    # The busiest row fills its slots exactly; the others leave empty ones (row 2: all empty).
    cap = targets.TargetCapacity(image=counts[0], text=counts[1], group=group)
    assert cap.image < group * L and cap.text < L  # the heads really run on fewer positions
    (loss, m), g = _losses_and_grads(model, params, batch, objective, cap)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ref_m:
        np.testing.assert_allclose(m[name], ref_m[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # float32 sums in another order: each leaf's error scales with its largest entries
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max())), g, ref_g)
    assert float(m["targets_over_capacity"]) == 0.0


def test_gathered_losses_with_no_targets_anywhere_are_zero_and_finite():
    cfg = tiny_cfg(num_modalities=2, max_seq_len=L)
    batch = packed_batch(ROWS, L, VOCAB, LEVELS, seed=4)
    batch = dict(batch, image_mask=np.zeros_like(batch["image_mask"]),
                 text_mask=np.zeros_like(batch["text_mask"]))
    model, params = build(cfg, batch)
    objective = config_validation.objective_config(config_defaults.objective_config())
    (loss, m), g = _losses_and_grads(model, params, batch, objective, targets.TargetCapacity(8, 9))
    assert float(loss) == 0.0 and float(m["image_loss"]) == 0.0 and float(m["text_loss"]) == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_over_capacity_gives_nan_loss_under_jit_and_counts_it():
    cfg = tiny_cfg(num_modalities=2, max_seq_len=L)
    batch = packed_batch(ROWS, L, VOCAB, LEVELS, seed=4)
    model, params = build(cfg, batch)
    objective = config_validation.objective_config(config_defaults.objective_config())
    most = int(batch["image_mask"].sum(1).max())  # row 1: 8 image targets
    cap = targets.TargetCapacity(image=most - 1, text=L)
    (loss, m), _ = _losses_and_grads(model, params, batch, objective, cap)
    assert np.isnan(float(loss)) and float(m["targets_over_capacity"]) == 1.0
    with pytest.raises(ValueError, match="image targets"):
        objectives.compute_losses(model, params, batch, key(7), objective, train=False,
                                  capacity=cap)
