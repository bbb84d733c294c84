"""Reconstruction metrics: PSNR, codebook usage / perplexity, batched evaluation, PNG grid."""
import math

import numpy as np
import pytest
from PIL import Image

from mmjax import pictures
from mmjax.evals import recon


def test_psnr_known_values():
    a = np.zeros((2, 4, 4, 3), np.float32)
    b = np.full_like(a, 0.1)  # MSE 0.01 in [-1, 1] range -> 10 log10(4 / 0.01)
    assert float(recon.psnr(a, b, 2.0)) == pytest.approx(10 * math.log10(400), rel=1e-5)
    assert float(recon.psnr(a, b, 1.0)) == pytest.approx(20.0, rel=1e-5)
    u = np.zeros((1, 2, 2, 3), np.uint8)
    v = np.full_like(u, 255)  # MSE = 255^2 -> 0 dB
    assert float(recon.psnr(u, v, 255.0)) == pytest.approx(0.0, abs=1e-5)
    assert math.isinf(float(recon.psnr(a, a, 2.0)))  # identical -> +inf (documented, no cap)
    with pytest.raises(ValueError, match="shapes differ"):
        recon.psnr(a, a[:1], 2.0)


def test_codebook_stats_known_histograms():
    uniform = recon.codebook_stats(np.arange(8).repeat(3), 8)
    assert uniform["usage"] == 1.0
    assert uniform["perplexity"] == pytest.approx(8.0)
    half = recon.codebook_stats(np.array([[0, 1], [0, 1]]), 4)
    assert half["usage"] == 0.5
    assert half["perplexity"] == pytest.approx(2.0)
    single = recon.codebook_stats(np.full((5, 5), 3, np.int32), 10)
    assert single["usage"] == pytest.approx(0.1)
    assert single["perplexity"] == pytest.approx(1.0)
    skewed = recon.codebook_stats(np.array([0, 0, 0, 1]), 4)  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed["perplexity"] == pytest.approx(math.exp(entropy))


def test_codebook_stats_rejects_bad_indices():
    with pytest.raises(ValueError, match="outside"):
        recon.codebook_stats(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="outside"):
        recon.codebook_stats(np.array([-1, 2]), 4)
    with pytest.raises(ValueError, match="integers"):
        recon.codebook_stats(np.array([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="no tokens"):
        recon.codebook_stats(np.array([], np.int32), 4)


def test_codebook_stats_of_a_grid_too_large_for_a_dense_histogram():
    """FSQ (8,) * 10 has 2^30 codes: a dense int64 histogram would take 8 GiB."""
    size = 2**30
    tokens = np.array([0, size - 1, 5, 5], np.int32)
    stats = recon.codebook_stats(tokens, size)
    assert stats["usage"] == 3 / size
    entropy = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))  # p = (1/4, 1/4, 1/2)
    assert stats["perplexity"] == pytest.approx(math.exp(entropy))
    usage = recon.usage_by_token_count(iter([tokens[:3], tokens[3:]]), size, [2, 4])
    assert usage == {2: 2 / size, 4: 3 / size}


def test_usage_by_token_count_counts_exact_prefixes_across_batches():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 50, 400)
    batches = [tokens[:7], tokens[7:200].reshape(-1, 1), tokens[200:]]  # boundaries off the counts
    out = recon.usage_by_token_count(iter(batches), 50, [100, 10, 400])
    assert list(out) == [10, 100, 400]
    for n, usage in out.items():
        assert usage == recon.codebook_stats(tokens[:n], 50)["usage"]
    assert out[10] <= 10 / 50 < out[400]
    with pytest.raises(ValueError, match="ended after 400 tokens; 401"):
        recon.usage_by_token_count(iter(batches), 50, [401])
    with pytest.raises(ValueError, match="positive"):
        recon.usage_by_token_count(iter(batches), 50, [0])
    with pytest.raises(ValueError, match="usage_by_token_count: indices span .* outside"):
        recon.usage_by_token_count(iter([np.array([50])]), 50, [1])


def test_evaluate_autoencoder_pools_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8) for _ in range(2)]

    def apply_fn(images):  # off by 2 everywhere (MSE 4) and one token per image: its mean > 127
        recon = np.clip(images.astype(np.int32) + 2, 0, 255).astype(np.uint8)
        recon = np.where(images > 253, images - 2, recon)
        return recon, (images.reshape(len(images), -1).mean(-1) > 127).astype(np.int32)[:, None]

    out = recon.evaluate_autoencoder(apply_fn, [{"image": batches[0]}, batches[1]], codebook_size=4)
    assert out["mse"] == pytest.approx(4.0)
    assert out["psnr"] == pytest.approx(10 * math.log10(255**2 / 4))
    all_images = np.concatenate(batches)
    want = recon.codebook_stats(apply_fn(all_images)[1], 4)
    assert out["usage"] == want["usage"] and out["perplexity"] == pytest.approx(want["perplexity"])
    with pytest.raises(ValueError, match="no images"):
        recon.evaluate_autoencoder(apply_fn, [], 4)


def test_save_reconstruction_grid_writes_png_of_expected_size(tmp_path):
    rng = np.random.default_rng(1)
    originals = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    recons = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "grid.png"
    grid = pictures.save_reconstruction_grid(originals, recons, str(path), ncols=3, pad=2)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (3 * (6 + 2) + 2, 2 * 2 * (8 + 2) + 2)  # (width, height): 2 rows x 2
        pixels = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(pixels, grid)
    # Image 4 (row 1, col 1): original at the top of its row pair, its reconstruction below.
    y, x = 2 + 2 * (8 + 2), 2 + (6 + 2)
    np.testing.assert_array_equal(pixels[y:y + 8, x:x + 6], originals[4])
    np.testing.assert_array_equal(pixels[y + 10:y + 18, x:x + 6], recons[4])


def test_grid_rejects_float_or_mismatched_inputs(tmp_path):
    x = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="originals must be uint8"):
        pictures.save_reconstruction_grid(x.astype(np.float32), x, str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="differ in shape"):
        pictures.save_reconstruction_grid(x, x[:1], str(tmp_path / "a.png"))
