"""FSQ math: bijection, grid, bounds, straight-through gradient, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.tokenizers.fsq import FSQ

LEVEL_SETS = [(8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (2, 3), (8, 8, 8, 5, 5, 5)]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_indices_codes_bijection_over_all_indices(levels):
    fsq = FSQ(levels)
    indices = np.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (fsq.codebook_size, len(levels))
    # Every code is distinct, lies on its channel's grid, and maps back to its own index.
    assert len(np.unique(codes, axis=0)) == fsq.codebook_size
    for channel, grid in enumerate(fsq.grid_values()):
        assert np.isin(codes[:, channel], grid).all()
        assert set(np.unique(codes[:, channel])) == set(grid)
    np.testing.assert_array_equal(fsq.codes_to_indices(codes), indices)
    # The jax path gives the same answers.
    jax_codes = fsq.indices_to_codes(jnp.asarray(indices, jnp.int32))
    np.testing.assert_array_equal(np.asarray(jax_codes), codes)
    np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(jax_codes)), indices)


def test_index_basis_is_mixed_radix_first_channel_fastest():
    fsq = FSQ((8, 5, 5, 5))
    np.testing.assert_array_equal(fsq.basis, [1, 8, 40, 200])
    # Index 1 moves only channel 0 by one step; index 8 moves only channel 1.
    c0, c1, c8 = fsq.indices_to_codes(np.array([0, 1, 8]))
    np.testing.assert_allclose(c1 - c0, [0.25, 0, 0, 0])
    np.testing.assert_allclose(c8 - c0, [0, 0.5, 0, 0])
    np.testing.assert_allclose(c0, [-1, -1, -1, -1])


def test_properties():
    fsq = FSQ([8, 5, 5, 5])
    assert fsq.levels == (8, 5, 5, 5)
    assert fsq.dim == 4
    assert fsq.codebook_size == 1000
    assert FSQ((8, 6, 5)).codebook_size == 240
    assert FSQ((8, 8, 8, 5, 5, 5)).codebook_size == 64000
    np.testing.assert_array_equal(FSQ((8, 6, 5)).half_width, [4, 3, 2])


def test_grid_odd_levels_symmetric_even_levels_asymmetric():
    odd, even, two = FSQ((5,)).grid_values()[0], FSQ((8,)).grid_values()[0], FSQ((2,)).grid_values()[0]
    np.testing.assert_allclose(odd, [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(odd, -odd[::-1])
    # Reference behaviour for even L: integers -L/2 .. L/2-1 divided by L/2.
    np.testing.assert_allclose(even, np.arange(-4, 4) / 4)
    np.testing.assert_allclose(two, [-1, 0])
    np.testing.assert_allclose(FSQ((6,)).grid_values()[0], np.arange(-3, 3) / 3)


def test_bound_matches_reference_formula_and_range():
    levels = (8, 5, 2, 7)
    fsq = FSQ(levels)
    z = jnp.linspace(-6.0, 6.0, 401)[:, None] * jnp.ones((1, 4))
    got = np.asarray(fsq.bound(z))
    for i, level in enumerate(levels):
        half_l = (level - 1) * (1 + 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        shift = np.arctanh(offset / half_l)
        want = np.tanh(np.asarray(z[:, i], np.float64) + shift) * half_l - offset
        np.testing.assert_allclose(got[:, i], want, rtol=1e-5, atol=1e-5)
        lo, hi = -(level // 2), level - 1 - level // 2
        assert got[:, i].min() > lo - 0.5 and got[:, i].max() < hi + 0.5
    # bound(0) rounds to the zero code for every level (even levels are shifted by half a step).
    np.testing.assert_allclose(np.round(fsq.bound(jnp.zeros(4))), 0, atol=0)


def test_quantize_codes_on_grid_cover_all_values_and_batch_shapes():
    fsq = FSQ((8, 6, 5))
    z = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 7, 9, 3))
    codes = fsq.quantize(z)
    assert codes.shape == z.shape
    assert float(jnp.abs(codes).max()) <= 1.0
    codes = np.asarray(codes).reshape(-1, 3)
    for channel, grid in enumerate(fsq.grid_values()):
        assert set(np.unique(codes[:, channel])) == set(grid)  # wide z reaches every level
    # Quantize is idempotent through the index round trip.
    np.testing.assert_array_equal(fsq.indices_to_codes(fsq.codes_to_indices(codes)), codes)
    # Large |z| saturates at the grid ends.
    np.testing.assert_allclose(fsq.quantize(jnp.full((3,), 50.0)), [0.75, 2 / 3, 1.0])
    np.testing.assert_allclose(fsq.quantize(jnp.full((3,), -50.0)), [-1, -1, -1])


def test_straight_through_gradient_is_bound_gradient_over_half_width():
    fsq = FSQ((8, 5, 5, 5))
    z = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    w = jax.random.normal(jax.random.PRNGKey(2), (6, 4))
    grad_q = jax.grad(lambda z: jnp.sum(fsq.quantize(z) * w))(z)
    grad_b = jax.grad(lambda z: jnp.sum(fsq.bound(z) * w))(z)
    np.testing.assert_allclose(grad_q, grad_b / fsq.half_width, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(grad_q).min()) > 0  # rounding did not kill the gradient


def test_snap_nearest_grid_point_clip_and_idempotent():
    fsq = FSQ((8, 5))
    grid = fsq.codebook()
    np.testing.assert_array_equal(fsq.snap(grid), grid)
    np.testing.assert_array_equal(np.asarray(fsq.snap(jnp.asarray(grid))), grid)
    x = np.array([[0.3, 0.3], [0.9, -0.8], [5.0, -5.0], [-0.13, 0.26]], np.float32)
    np.testing.assert_allclose(fsq.snap(x), [[0.25, 0.5], [0.75, -1.0], [0.75, -1.0], [-0.25, 0.5]])
    # Snapping random points gives grid points that are the nearest ones.
    pts = np.random.default_rng(0).uniform(-1.2, 1.2, (200, 2)).astype(np.float32)
    snapped = fsq.snap(pts)
    dist = np.abs(pts[:, None, :] - grid[None]).sum(-1)
    np.testing.assert_allclose(np.abs(pts - snapped).sum(-1), dist.min(1), atol=1e-6)
    np.testing.assert_array_equal(fsq.snap(snapped), snapped)


@pytest.mark.parametrize("levels", [(), (1, 5), (8, 0), (2.5,), ("8",), (True,), 5, None])
def test_bad_levels_raise_naming_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)


def test_wrong_last_axis_and_float_indices_raise():
    fsq = FSQ((8, 5, 5, 5))
    with pytest.raises(ValueError, match="dim=4"):
        fsq.quantize(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="dim=4"):
        fsq.codes_to_indices(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="integers"):
        fsq.indices_to_codes(np.zeros(3, np.float32))


def test_jit_and_numpy_dispatch():
    fsq = FSQ((7, 5, 5, 5, 5))
    idx = np.arange(0, fsq.codebook_size, 97)
    codes = jax.jit(fsq.indices_to_codes)(jnp.asarray(idx, jnp.int32))
    assert isinstance(codes, jax.Array)
    assert isinstance(fsq.indices_to_codes(idx), np.ndarray)
    np.testing.assert_array_equal(jax.jit(fsq.codes_to_indices)(codes), idx)
    assert fsq.codes_to_indices(np.asarray(codes)).dtype == np.int32
