"""FID and KID between two sets of images, on FID InceptionV3 pool3 features (mmjax/evals/inception.py).

Weights file (`eval.inception_weights`): an `.npz` whose arrays are pytorch-fid's state dict
(`pt_inception-2015-12-05-6726825d.pth`, the port of the TF FID graph), names and pytorch layouts
unchanged, e.g. `Conv2d_1a_3x3.conv.weight` [32, 3, 3, 3] and `Mixed_7c.branch_pool.bn.running_var`
[192]; `fc.*` is ignored. Convert once where torch is installed:

    python -c "import torch, numpy as np; f = 'pt_inception-2015-12-05-6726825d.pth'; \
sd = torch.serialization.load(f, weights_only=True); \
np.savez('inception_fid.npz', **{k: v.numpy() for k, v in sd.items()})"

(`weights_only=True`: tensors only, no arbitrary objects are unpickled; mmjax itself reads .npz.)

Why eigenvalues for the matrix square root: Tr(sqrtm(S1 S2)) equals the sum of the square roots
of the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric PSD matrix, so `eigh` gives it without the
complex round-off of a general `sqrtm` (checked against scipy.linalg.sqrtm in tests/test_fid.py).
KID is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
over random subsets (Binkowski et al. 2018), which is unbiased at small sample sizes where FID is not.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np

from mmjax.evals import inception


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) for Gaussians (mu, sigma)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0, None))))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_features(a, b) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _mmd2_unbiased(x, y) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid_from_features(a, b, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of both sets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                             b[rng.choice(len(b), size, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def load_inception_params(path: str) -> dict:
    """Flax params of FIDInceptionV3 from the .npz layout above; ValueError naming what is wrong."""
    if not os.path.isfile(path):
        raise ValueError(f"eval.inception_weights={path!r} does not exist")
    expected = inception.flat_param_shapes()
    try:
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files if k in expected}
    except (OSError, ValueError) as e:
        raise ValueError(f"eval.inception_weights={path!r} is not an .npz file ({e})") from e
    for name, shape in expected.items():
        if name not in flat:
            raise ValueError(f"{path}: missing array {name!r} (pytorch-fid state-dict names expected)")
        if tuple(flat[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(flat[name].shape)}, expected {shape}")
    return inception.unflatten_torch(flat, list(expected))


def feature_fn(params, batch_size: int = 32, resize: int = 299):
    """images uint8 [N, H, W, 3] -> float64 [N, 2048], in jitted batches (the last padded).

    `resize` is the network's input side: 299 for FID; smaller only to test quickly."""
    net = inception.FIDInceptionV3(resize)
    apply = jax.jit(lambda x: net.apply({"params": params}, x))

    def features(images):
        images = np.asarray(images)
        out = []
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size].astype(np.float32) / 255.0
            pad = batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(apply(chunk), np.float64)[: batch_size - pad])
        return np.concatenate(out)

    return features


def fid_kid(weights_path: str, generated, reference, batch_size: int = 32,
            kid_subset_size: int = 1000) -> dict:
    """{"fid", "kid", "kid_std", "fid_num_images"} between two uint8 image sets."""
    features = feature_fn(load_inception_params(weights_path), batch_size)
    a, b = features(generated), features(reference)
    kid, kid_std = kid_from_features(a, b, kid_subset_size)
    return {"fid": fid_from_features(a, b), "kid": kid, "kid_std": kid_std,
            "fid_num_images": int(min(len(a), len(b)))}


def maybe_fid_kid(eval_cfg, generated, reference) -> dict:
    """fid_kid when `eval.inception_weights` is set, else {} and one log line saying why not."""
    path = str(eval_cfg.get("inception_weights", "")) if eval_cfg is not None else ""
    if not path:
        logging.info("FID/KID off: eval.inception_weights is empty (give an .npz of pytorch-fid's "
                     "InceptionV3 weights; layout in mmjax/evals/fid.py)")
        return {}
    return fid_kid(path, generated, reference, int(eval_cfg.get("fid_batch_size", 32)),
                   int(eval_cfg.get("kid_subset_size", 1000)))
