"""FID/KID maths against reference formulas (scipy.linalg.sqrtm, the plain MMD sum), and the
InceptionV3 weights-file path with a randomly initialised file of pytorch-fid's layout."""
import logging

import jax
import numpy as np
import pytest
import scipy.linalg

from mmjax.evals import fid, inception


def _reference_fid(a, b):
    """pytorch-fid's formula: scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.5, 1.0), (0.0, 2.0), (1.0, 0.3)])
def test_frechet_distance_matches_scipy_sqrtm(shift, scale):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16))
    a = rng.normal(size=(400, 16)) @ mix
    b = (rng.normal(size=(300, 16)) * scale + shift) @ mix.T
    assert fid.fid_from_features(a, b) == pytest.approx(_reference_fid(a, b), rel=1e-6, abs=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(1).normal(size=(200, 8))
    assert abs(fid.fid_from_features(a, a)) < 1e-8


def test_kid_matches_the_plain_sum():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(6, 5)) + 0.3
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(6)) / 42
    assert fid._mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    same = fid.kid_from_features(rng.normal(size=(100, 5)), rng.normal(size=(100, 5)), 50, 20)[0]
    apart = fid.kid_from_features(rng.normal(size=(100, 5)), rng.normal(size=(100, 5)) + 1, 50, 20)[0]
    assert apart > same


def _torch_layout(params):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        out[".".join(p.key for p in path)] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    return out


def _random_params(net):
    """Random weights in the network's tree, drawn with numpy over `eval_shape`: running the
    Inception init (and a jax RNG per leaf) cost ~45 s of compiling on a 2-core CPU. Running
    variances stay positive, so the features are finite."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))

    def draw(path, leaf):
        if path[-1].key == "running_var":
            return (1.0 + 0.1 * rng.uniform(size=leaf.shape)).astype(leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def test_weights_file_loads_into_the_network(tmp_path, caplog):
    net = inception.FIDInceptionV3(resize=75)  # the smallest input InceptionV3 takes: fast on CPU
    images = (np.random.default_rng(3).uniform(size=(2, 32, 32, 3)) * 255).astype(np.uint8)
    params = _random_params(net)
    flat = _torch_layout(params)
    assert {k: v.shape for k, v in flat.items()} == inception.flat_param_shapes()
    path = tmp_path / "inception.npz"
    np.savez(path, **flat, **{"fc.weight": np.zeros((1008, 2048), np.float32)})  # fc is ignored
    loaded = fid.load_inception_params(str(path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    features = fid.feature_fn(loaded, batch_size=3, resize=75)  # batches padded to 3: one compile
    feats = features(images)
    assert feats.shape == (2, inception.FEATURE_DIM) and np.isfinite(feats).all()
    assert np.abs(feats[0] - feats[1]).max() > 0  # different pictures, different features
    np.testing.assert_allclose(features(images[1:]), feats[1:], rtol=1e-5, atol=1e-6)
    # a wrong file is one clear error naming the array
    del flat["Mixed_6b.branch7x7_2.conv.weight"]
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.conv.weight"):
        fid.load_inception_params(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="does not exist"):
        fid.load_inception_params(str(tmp_path / "none.npz"))
    with caplog.at_level(logging.INFO):
        assert fid.maybe_fid_kid({"inception_weights": ""}, images, images) == {}
    assert "FID/KID off: eval.inception_weights is empty" in caplog.text


def test_backbone_has_inception_v3_parameter_count():
    """torchvision's InceptionV3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and fc
    (2,049,000) that is the 21,785,568 of the feature network (BatchNorm stats are buffers)."""
    shapes = inception.flat_param_shapes()
    n = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
    assert n == 21_785_568
