"""Natural-image crops for tokenizer studies: the two photos scikit-learn ships, plus its digits.

Why: the shapes set is mostly flat background in six colours, so a tokenizer has little to encode
and codebook usage says more about the data than about the quantizer. `load_sample_images()`
(china.jpg, flower.jpg, 427x640 each) are real photographs with texture, edges and smooth
gradients, shipped inside scikit-learn (no network). Random square crops at several scales with
horizontal flips, resized to `image_size`, give an unbounded stream of natural patches; a share
of the records (`DIGIT_FRACTION`) are scikit-learn's handwritten digits (mmjax.data.digits).

Held-out regions: each photo is cut into a `TILE_GRID` grid of tiles; a fixed permutation
(`SPLIT_SEED`, independent of the data seed) gives `HELD_OUT_TILES` tiles per photo to validation
and as many to test, the rest to train. A crop lies entirely inside one tile of its split, so no
validation or test pixel is ever seen in training. Digits follow digits.split_indices (disjoint).

Record i of a split depends only on (seed, split, i): its generator is
`np.random.default_rng([seed, split_id, i])`.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from mmjax.data import digits
from mmjax.data.contract import SPLITS

PHOTOS = ("china", "flower")  # load_sample_images() order
TILE_GRID = (4, 4)  # rows x columns of tiles per photo (tiles of ~106 x 160 pixels)
HELD_OUT_TILES = 2  # tiles per photo for validation, and as many for test
SPLIT_SEED = 20261202  # Fixed: which tiles are held out.
CROP_FRACTIONS = (0.25, 0.375, 0.5, 0.75, 1.0)  # crop side / the tile's shorter side (the scales)
DIGIT_FRACTION = 0.125  # share of records that are handwritten digits


@functools.lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The two sample photos, uint8 [427, 640, 3] each (loaded from scikit-learn's package)."""
    from sklearn.datasets import load_sample_images  # local: slow import, only needed here
    return tuple(np.asarray(img, np.uint8) for img in load_sample_images().images)


def tile_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each tile, row-major; tiles cover the photo exactly."""
    rows, cols = TILE_GRID
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    xs = np.linspace(0, width, cols + 1).round().astype(int)
    return [(int(ys[r]), int(xs[c]), int(ys[r + 1]), int(xs[c + 1]))
            for r in range(rows) for c in range(cols)]


def split_tiles(split: str) -> list[tuple[int, int]]:
    """(photo, tile) pairs whose pixels belong to `split` (disjoint across splits, fixed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n_tiles = TILE_GRID[0] * TILE_GRID[1]
    out = []
    for photo in range(len(PHOTOS)):
        perm = np.random.default_rng([SPLIT_SEED, photo]).permutation(n_tiles)
        parts = {"validation": perm[:HELD_OUT_TILES],
                 "test": perm[HELD_OUT_TILES:2 * HELD_OUT_TILES],
                 "train": perm[2 * HELD_OUT_TILES:]}
        out.extend((photo, int(t)) for t in sorted(parts[split]))
    return out


def crop_box(rng: np.random.Generator, tile: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A random square (top, left, bottom, right) inside `tile` at one of CROP_FRACTIONS."""
    top, left, bottom, right = tile
    short = min(bottom - top, right - left)
    side = max(1, int(round(short * CROP_FRACTIONS[rng.integers(len(CROP_FRACTIONS))])))
    y = top + int(rng.integers(bottom - top - side + 1))
    x = left + int(rng.integers(right - left - side + 1))
    return y, x, y + side, x + side


def photo_crop(rng: np.random.Generator, split: str, image_size: int) -> tuple[np.ndarray, str, dict]:
    """(uint8 [S, S, 3] crop, caption, provenance {photo, box, flip}) from the split's tiles."""
    tiles = split_tiles(split)
    photo, tile = tiles[rng.integers(len(tiles))]
    img = photos()[photo]
    box = crop_box(rng, tile_boxes(*img.shape[:2])[tile])
    flip = bool(rng.integers(2))
    patch = img[box[0]:box[2], box[1]:box[3]]
    if flip:
        patch = patch[:, ::-1]
    out = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize(
        (image_size, image_size), Image.BICUBIC), np.uint8)
    return out, f"a crop of the {PHOTOS[photo]} photo", {"photo": photo, "box": box, "flip": flip}


def generate_record(seed: int, split: str, index: int, image_size: int = 32,
                    max_objects: int = 3) -> dict:
    """Record `index` of `split`: a photo crop (label -1) or, with DIGIT_FRACTION, a digit."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_id = SPLITS.index(split)
    rng = np.random.default_rng([int(seed), split_id, int(index)])
    if rng.random() < DIGIT_FRACTION:
        pool = digits.split_indices(split)
        images, labels = digits._load()
        source = int(pool[rng.integers(len(pool))])
        label = int(labels[source])
        image, caption = digits.to_rgb(images[source], image_size), digits.caption_from_label(label)
    else:
        image, caption, _ = photo_crop(rng, split, image_size)
        label = -1
    return {"image": image, "caption": caption,
            "attributes": np.full((max_objects, 5), -1, dtype=np.int32),
            "label": np.int32(label), "index": np.int64(index)}
