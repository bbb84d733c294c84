"""FSQ autoencoder: shapes, grid codes, logical names, STE gradient, a short training, the loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import config_defaults
from mmjax.evals import recon as recon_eval
from mmjax.tokenizers import autoencoder as ae
from mmjax.tokenizers.fsq import FSQ

LEVELS = (8, 5, 5, 5)


def tiny(channels=(8, 16), levels=LEVELS, blocks=1, patch=1):
    return ae.FSQAutoencoder(levels=levels, channels=channels, num_res_blocks=blocks, norm_groups=4,
                             patch_size=patch)


def structured_images(n, size, seed=0):
    """uint8 images of a flat background with one coloured rectangle each (learnable structure)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i] = rng.integers(0, 256, 3)
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        images[i, y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return images


@pytest.mark.parametrize("size,channels,patch,grid", [
    (32, (8, 16), 1, 16), (64, (8, 16), 1, 32), (32, (8, 16, 16), 1, 8), (64, (8, 8, 16, 16), 1, 8),
    (32, (8, 16), 2, 8), (32, (16, 16, 16), 2, 4), (24, (8, 16), 3, 4)])
def test_shapes_and_downsample_factor(size, channels, patch, grid):
    model = tiny(channels, patch=patch)
    assert model.downsample == size // grid == ae.downsample_factor(channels, patch)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8)
    params = jax.eval_shape(lambda: nn.unbox(ae.init_params(model, jax.random.PRNGKey(0), size)))
    recon, codes = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images)
    assert recon.shape == (2, size, size, 3) and recon.dtype == jnp.float32
    assert codes.shape == (2, grid, grid, len(LEVELS))
    tokens = jax.eval_shape(lambda p, x: ae.tokenize(model, p, x), params, images)
    assert tokens.shape == (2, grid * grid) and tokens.dtype == jnp.int32


def test_every_param_has_logical_axis_names():
    boxed = jax.eval_shape(lambda: ae.init_params(tiny((8, 16, 16), blocks=2), jax.random.PRNGKey(0), 16))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) > 20
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    specs = nn.get_partition_spec(boxed)
    assert specs["encoder"]["down_1"]["kernel"] == jax.sharding.PartitionSpec(
        "conv_h", "conv_w", "conv_in", "conv_out")
    assert specs["encoder"]["to_code"]["kernel"][-1] == "code"
    assert specs["decoder"]["res_0_0"]["GroupNorm_0"]["scale"] == jax.sharding.PartitionSpec("conv_out")


def test_space_to_depth_folds_pixel_blocks_and_depth_to_space_unfolds_them():
    x = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
    folded = np.asarray(ae.space_to_depth(jnp.asarray(x), 2))
    assert folded.shape == (2, 2, 3, 12)
    # position (i, j) holds the 2x2 block at rows 2i..2i+1, columns 2j..2j+1, row-major, RGB inner
    np.testing.assert_array_equal(folded[1, 1, 2], x[1, 2:4, 4:6].reshape(-1))
    np.testing.assert_array_equal(np.asarray(ae.depth_to_space(jnp.asarray(folded), 2)), x)
    assert ae.space_to_depth(x, 1) is x and ae.depth_to_space(x, 1) is x


def test_patch_size_changes_only_the_pixel_facing_convs():
    """patch_size=1 is the original layout (its checkpoints load unchanged); patch_size=2 widens
    the stem's input and the last conv's output to 12 = 3 * 2 * 2 channels and nothing else."""
    shapes = {p: jax.eval_shape(lambda p=p: nn.unbox(ae.init_params(tiny((8, 16), patch=p),
                                                                     jax.random.PRNGKey(0), 16)))
              for p in (1, 2)}
    one, two = (jax.tree_util.tree_leaves_with_path(shapes[p]) for p in (1, 2))
    assert [k for k, _ in one] == [k for k, _ in two]
    differ = {jax.tree_util.keystr(k): (a.shape, b.shape) for (k, a), (_, b) in zip(one, two)
              if a.shape != b.shape}
    assert differ == {"['encoder']['stem']['kernel']": ((3, 3, 3, 8), (3, 3, 12, 8)),
                      "['decoder']['to_pixel']['kernel']": ((3, 3, 8, 3), (3, 3, 8, 12)),
                      "['decoder']['to_pixel']['bias']": ((3,), (12,))}


def test_pixel_conversion_roundtrip():
    all_values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = ae.images_to_float(all_values)
    assert x.min() == -1.0 and x.max() == 1.0 and x.dtype == np.float32
    np.testing.assert_array_equal(ae.float_to_images(x), all_values)
    np.testing.assert_array_equal(ae.float_to_images(jnp.asarray(x)), all_values)
    np.testing.assert_array_equal(ae.float_to_images(np.array([-3.0, 3.0])), [0, 255])
    with pytest.raises(ValueError, match="uint8"):
        ae.images_to_float(x)


def test_reconstruction_loss_known_values():
    target = jnp.zeros((2, 4, 4, 3))
    recon = jnp.full((2, 4, 4, 3), 0.5)
    assert float(ae.reconstruction_loss(recon, target, "l2")) == pytest.approx(0.25)
    assert float(ae.reconstruction_loss(recon, target, "l1+l2", 0.1)) == pytest.approx(0.30)
    with pytest.raises(ValueError, match="fsq.loss"):
        ae.reconstruction_loss(recon, target, "l1")


def test_bad_architecture_and_inputs_raise():
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="norm_groups"):
        ae.init_params(ae.FSQAutoencoder(LEVELS, (8, 12), norm_groups=8), rng, 16)
    with pytest.raises(ValueError, match="levels"):
        ae.init_params(ae.FSQAutoencoder((8, 1), (8, 16), norm_groups=4), rng, 16)
    with pytest.raises(ValueError, match="downsampling factor 4"):
        ae.init_params(tiny((8, 16, 16)), rng, 18)
    with pytest.raises(ValueError, match=r"downsampling factor 4 \(fsq.patch_size"):
        ae.init_params(tiny((8, 16), patch=2), rng, 18)
    with pytest.raises(ValueError, match="fsq.patch_size=0"):
        ae.init_params(tiny((8, 16), patch=0), rng, 16)


def test_from_config_matches_defaults():
    cfg = config_defaults.fsq_config()
    model = ae.autoencoder_from_config(cfg)
    assert model.levels == tuple(cfg.levels) and model.channels == tuple(cfg.channels)
    assert model.norm_groups == cfg.norm_groups and model.patch_size == cfg.patch_size == 1
    cfg.patch_size = 2
    assert ae.autoencoder_from_config(cfg).patch_size == 2
    full = config_defaults.base_config()
    full.fsq.levels = (7, 5, 5, 5, 5)
    assert ae.autoencoder_from_config(full).levels == (7, 5, 5, 5, 5)  # full config: reads .fsq


@pytest.mark.parametrize("patch", [1, 2])
def test_training_codes_gradients_and_tokenize(patch):
    """One compiled step function, reused: STE gradients reach the encoder and loss drops."""
    cfg = config_defaults.fsq_config()
    cfg.loss = "l1+l2"
    model = tiny((8, 16), patch=patch)
    grid = 16 // model.downsample
    images = structured_images(8, 16)
    batch = {"image": images}
    params = nn.unbox(ae.init_params(model, jax.random.PRNGKey(0), 16))
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: ae.autoencoder_loss_fn(model, p, batch, jax.random.PRNGKey(0), cfg),
            has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, metrics, grads

    losses = []
    for i in range(30):
        params, opt_state, metrics, grads = step(params, opt_state)
        losses.append(float(metrics["loss"]))
        if i == 0:
            # Straight-through: the encoder gets gradients through the rounding (whose true
            # derivative is 0). Residual branches start at zero, so only the trunk is checked here.
            for name in ("stem", "down_1", "to_code"):
                assert float(jnp.abs(grads["encoder"][name]["kernel"]).max()) > 0, name
            assert set(metrics) == {"loss", "mse", "psnr"}
            assert float(metrics["psnr"]) == pytest.approx(
                10 * np.log10(4 / float(metrics["mse"])), rel=1e-4)
    assert losses[-1] < 0.5 * losses[0], losses
    for path, g in jax.tree_util.tree_leaves_with_path(grads["encoder"]):  # now every leaf
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)

    # Codes lie on the FSQ grid; tokenize / detokenize agree with encode / decode.
    fsq = FSQ(LEVELS)
    codes = np.asarray(model.apply({"params": params}, images, method=ae.FSQAutoencoder.encode))
    assert codes.shape == (8, grid, grid, 4)
    np.testing.assert_array_equal(fsq.snap(codes), codes)
    recon_fn = ae.make_recon_fn(model, params)
    recon_u8, indices = recon_fn(images)
    np.testing.assert_array_equal(indices, fsq.codes_to_indices(codes).reshape(8, -1))
    decoded = ae.detokenize(model, params, indices, (grid, grid))
    np.testing.assert_array_equal(ae.float_to_images(decoded), recon_u8)
    stats = recon_eval.evaluate_autoencoder(recon_fn, [images], fsq.codebook_size)
    assert stats["psnr"] > 10 * np.log10(4 / losses[0])  # trained model beats the initial one
    assert 0 < stats["usage"] <= 1


def test_the_tokenize_stage_encodes_data_parallel_over_local_devices():
    """local_encoder: the batch split over every local device (8 in the tests) gives the indices
    one device gives, also for batches the device count does not divide."""
    from mmjax.stages.tokenize import local_encoder
    assert jax.local_device_count() > 1  # conftest simulates several CPU devices
    model = tiny((8, 16))
    params = nn.unbox(ae.init_params(model, jax.random.PRNGKey(0), 16))
    images = structured_images(13, 16)
    expected = np.asarray(jax.jit(lambda x: ae.tokenize(model, params, x))(images))
    encode = local_encoder(model, params)
    np.testing.assert_array_equal(encode(images), expected)
    np.testing.assert_array_equal(encode(images[:3]), expected[:3])  # fewer images than devices
