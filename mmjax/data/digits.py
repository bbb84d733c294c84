"""scikit-learn's bundled handwritten digits as an image-caption dataset (no download).

Why: a second embedded dataset with *natural* (hand-drawn) images, small enough to ship inside
scikit-learn, so the image tokenizer and the captioner can be tested on something less regular than
the procedural shapes. 1797 grayscale 8x8 images with values 0..16 become RGB uint8 at
`image_size` (bilinear upsampling, white ink on black) with captions "a handwritten digit seven".

The split is a fixed permutation (seed `SPLIT_SEED`, independent of the data seed) cut into
train/validation/test by `SPLIT_FRACTIONS`, so the test set never changes between runs or configs.
`num_train` / `num_validation` / `num_test` are caps: a split holds the first
`min(cap, available)` images of its part.
"""
from __future__ import annotations

import functools
import re

import numpy as np
from PIL import Image

from mmjax.data.contract import SPLITS

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # Shares of the 1797 images per split (train gets the rest).
SPLIT_SEED = 20240601  # Fixed: the permutation that assigns images to splits.
MAX_VALUE = 16  # load_digits pixel range is 0..16.
_CAPTION_RE = re.compile(r"^an? handwritten digit (?P<name>{})$".format("|".join(DIGIT_NAMES)))


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8-able float [1797, 8, 8] in 0..16, labels int [1797]) from scikit-learn."""
    from sklearn.datasets import load_digits  # local: sklearn import is slow and only needed here

    data = load_digits()
    return data.images, data.target


def split_indices(split: str) -> np.ndarray:
    """Indices into the 1797 images that form `split` (disjoint across splits, fixed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    total = len(_load()[1])
    perm = np.random.default_rng(SPLIT_SEED).permutation(total)
    n_val = int(round(SPLIT_FRACTIONS[1] * total))
    n_test = int(round(SPLIT_FRACTIONS[2] * total))
    parts = {"test": perm[:n_test], "validation": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    return parts[split]


def split_size(split: str, cap: int) -> int:
    """Number of records in `split` when at most `cap` are requested."""
    if cap < 0:
        raise ValueError(f"number of {split} examples must be >= 0, got {cap}")
    return min(int(cap), len(split_indices(split)))


def to_rgb(image_8x8: np.ndarray, image_size: int) -> np.ndarray:
    """Upsample one 0..16 8x8 digit to uint8 [S, S, 3] (bilinear, white ink on black)."""
    if image_size < 8:
        raise ValueError(f"image_size={image_size} is smaller than the 8x8 digits")
    gray = np.clip(np.round(np.asarray(image_8x8, np.float64) * (255.0 / MAX_VALUE)), 0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(gray).resize((image_size, image_size), Image.BILINEAR))
    return np.repeat(big[:, :, None], 3, axis=2)


def caption_from_label(label: int) -> str:
    """'a handwritten digit seven' for label 7."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be in 0..9, got {label}")
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def parse_caption(caption: str) -> int:
    """Inverse of `caption_from_label`: the digit a caption names; ValueError otherwise."""
    text = " ".join(str(caption).strip().lower().rstrip(".").split())
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(f"cannot parse digit caption {caption!r}")
    return DIGIT_NAMES.index(match["name"])


def generate_record(split: str, index: int, image_size: int = 32, max_objects: int = 3) -> dict:
    """Record `index` of `split`; attributes are all -1 ([max_objects, 5]) to share the schema."""
    indices = split_indices(split)
    if not 0 <= index < len(indices):
        raise ValueError(f"digits {split} index {index} out of range [0, {len(indices)})")
    images, labels = _load()
    source = indices[index]
    label = int(labels[source])
    return {
        "image": to_rgb(images[source], image_size),
        "caption": caption_from_label(label),
        "attributes": np.full((max_objects, 5), -1, dtype=np.int32),
        "label": np.int32(label),
        "index": np.int64(index),
    }
