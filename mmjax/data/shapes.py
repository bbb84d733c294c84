"""Procedural "shapes with captions" dataset: pure numpy, deterministic, random access.

Why procedural: the default dataset must ship inside the install (no download) and must make
text->image *checkable*: every image is drawn from a small attribute vocabulary, so a rule checker
(`mmjax.evals.shapes_checker`) can tell from the pixels whether a generated image obeys its prompt,
and `parse_caption` can tell whether a generated caption describes its image.

Each record is a function of `(seed, split, index)` only: its RNG is
`np.random.default_rng([seed, split_id, index])`, so any record can be produced without the others
(random access, parallel generation). Splits are disjoint *by attribute set*: every set of objects is
hashed to one split (`split_of_attributes`) and a record re-draws until its set lands in its split.
Validation/test therefore hold compositions never seen in training.

Layout: the image is a 3x3 grid; each object lives in its own cell (so objects never overlap and
same-coloured neighbours never touch), with a small random jitter that keeps it one pixel inside its
cell. Drawing is hard-edged (no anti-aliasing) in a fixed, well-separated palette on black.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from mmjax.data.contract import SPLITS

# --- Attribute vocabulary (ids are row values in `attributes`) -------------------------------
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
# Fixed RGB per colour; pairwise distances >= ~150 so a nearest-colour rule is unambiguous.
PALETTE = np.array(
    [
        (230, 30, 30),  # red
        (30, 200, 30),  # green
        (30, 60, 230),  # blue
        (240, 220, 20),  # yellow
        (220, 40, 220),  # magenta
        (20, 210, 220),  # cyan
    ],
    dtype=np.uint8,
)
BACKGROUND = np.array((0, 0, 0), dtype=np.uint8)
SIZES = ("small", "large")
GRID = 3  # The image is a GRID x GRID array of cells; one object per cell at most.
# Half-extent (centre to bounding-box edge) of an object, as a fraction of the cell side.
HALF_EXTENT = {0: 0.24, 1: 0.40}  # small, large
EDGE_MARGIN_PX = 1.0  # Objects stay this many pixels inside their cell (keeps neighbours apart).
ATTRIBUTE_FIELDS = ("shape", "color", "size", "x_cell", "y_cell")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
# Caption phrase of each (x_cell, y_cell).
POSITION_PHRASES = {
    (0, 0): "at the top left",
    (1, 0): "at the top",
    (2, 0): "at the top right",
    (0, 1): "on the left",
    (1, 1): "in the center",
    (2, 1): "on the right",
    (0, 2): "at the bottom left",
    (1, 2): "at the bottom",
    (2, 2): "at the bottom right",
}
# Share of attribute sets hashed to each split (in SPLITS order).
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MIN_IMAGE_SIZE = 32  # Below this a small object is too few pixels to keep a recognisable shape.
_MAX_REDRAWS = 10_000


def split_id(split: str) -> int:
    """Index of `split` in SPLITS; a clear error for anything else."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def valid_rows(attributes: np.ndarray) -> np.ndarray:
    """The non-padding rows of an attributes array, as int32 [n, 5]."""
    attributes = np.asarray(attributes, dtype=np.int32).reshape(-1, 5)
    return attributes[attributes[:, 0] >= 0]


def canonical(attributes: np.ndarray) -> np.ndarray:
    """Valid rows sorted in reading order (y_cell, x_cell): the order captions use."""
    rows = valid_rows(attributes)
    return rows[np.lexsort((rows[:, 3], rows[:, 4]))]


def pad_attributes(rows: np.ndarray, max_objects: int) -> np.ndarray:
    """Pad rows to int32 [max_objects, 5] with -1."""
    rows = np.asarray(rows, dtype=np.int32).reshape(-1, 5)
    if len(rows) > max_objects:
        raise ValueError(f"{len(rows)} objects exceed max_objects={max_objects}")
    out = np.full((max_objects, 5), -1, dtype=np.int32)
    out[: len(rows)] = rows
    return out


def split_of_attributes(attributes: np.ndarray) -> str:
    """The split an attribute set belongs to: a stable hash, so splits never share a set."""
    digest = hashlib.blake2b(canonical(attributes).astype("<i4").tobytes(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    edges = np.cumsum(SPLIT_FRACTIONS)
    return SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]


def _check_attributes(rows: np.ndarray) -> None:
    """Raise ValueError on out-of-vocabulary values or two objects in one cell."""
    limits = (len(SHAPES), len(COLORS), len(SIZES), GRID, GRID)
    for field, limit, column in zip(ATTRIBUTE_FIELDS, limits, rows.T):
        if np.any((column < 0) | (column >= limit)):
            raise ValueError(f"attribute {field!r} out of range [0, {limit}): {column.tolist()}")
    cells = rows[:, 3] * GRID + rows[:, 4]
    if len(np.unique(cells)) != len(cells):
        raise ValueError(f"two objects share a grid cell: {rows.tolist()}")


def max_jitter_px(size_id: int, image_size: int) -> float:
    """How far (pixels) an object's centre may move from its cell centre and stay inside."""
    cell = image_size / GRID
    return max(0.0, cell / 2 - HALF_EXTENT[size_id] * cell - EDGE_MARGIN_PX)


def shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r) -> np.ndarray:
    """Boolean mask of offsets (dx, dy) from the centre that fall inside `shape` of half-extent r.

    Broadcasts, so the checker can test many candidate centres / sizes at once.
    """
    name = SHAPES[shape]
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Upward isosceles triangle: apex (0, -r), base from (-r, r) to (r, r).
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def _object_mask(shape: int, cx: float, cy: float, r: float, image_size: int) -> np.ndarray:
    """Boolean [S, S] mask of pixels whose centres fall inside the object."""
    coords = np.arange(image_size) + 0.5
    return shape_mask(shape, coords[None, :] - cx, coords[:, None] - cy, r)


def render(attributes: np.ndarray, image_size: int = 32, jitter: np.ndarray | None = None) -> np.ndarray:
    """Draw the objects of `attributes` (int32 [k, 5], -1 rows ignored) as uint8 [S, S, 3].

    `jitter` (float [k, 2] in [-1, 1], one row per *attributes row*) moves each centre by that
    fraction of `max_jitter_px`; None draws every object at its cell centre.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is below the minimum {MIN_IMAGE_SIZE} for shapes")
    attributes = np.asarray(attributes, dtype=np.int32).reshape(-1, 5)
    if jitter is None:
        jitter = np.zeros((len(attributes), 2))
    jitter = np.clip(np.asarray(jitter, dtype=np.float64).reshape(len(attributes), 2), -1.0, 1.0)
    keep = attributes[:, 0] >= 0
    rows, jitter = attributes[keep], jitter[keep]
    _check_attributes(rows)
    image = np.broadcast_to(BACKGROUND, (image_size, image_size, 3)).copy()
    cell = image_size / GRID
    for (shape, color, size, x_cell, y_cell), (jx, jy) in zip(rows, jitter):
        reach = max_jitter_px(int(size), image_size)
        cx = (x_cell + 0.5) * cell + jx * reach
        cy = (y_cell + 0.5) * cell + jy * reach
        image[_object_mask(int(shape), cx, cy, HALF_EXTENT[int(size)] * cell, image_size)] = PALETTE[color]
    return image


# --- Captions -----------------------------------------------------------------------------------
def describe_object(row) -> str:
    """'a large red circle at the top left' for one attributes row."""
    shape, color, size, x_cell, y_cell = (int(v) for v in row)
    return f"a {SIZES[size]} {COLORS[color]} {SHAPES[shape]} {POSITION_PHRASES[(x_cell, y_cell)]}"


def caption_from_attributes(attributes: np.ndarray) -> str:
    """English caption listing the objects in reading order, joined by ' and '."""
    rows = canonical(attributes)
    if len(rows) == 0:
        raise ValueError("attributes hold no object (all rows are -1 padding)")
    _check_attributes(rows)
    return " and ".join(describe_object(row) for row in rows)


_PHRASE_TO_CELL = {phrase: cell for cell, phrase in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(
    r"^an? (?P<size>{}) (?P<color>{}) (?P<shape>{}) (?P<pos>{})$".format(
        "|".join(SIZES),
        "|".join(COLORS),
        "|".join(SHAPES),
        "|".join(re.escape(p) for p in sorted(_PHRASE_TO_CELL, key=len, reverse=True)),
    )
)


def parse_caption(caption: str, max_objects: int | None = None) -> np.ndarray:
    """Inverse of `caption_from_attributes`: int32 [n, 5] rows in reading order.

    With `max_objects` the result is padded with -1 rows to [max_objects, 5]. Raises ValueError
    on any text that is not a caption of this grammar (callers scoring generated text catch it).
    """
    text = " ".join(str(caption).strip().lower().rstrip(".").split())
    if not text:
        raise ValueError("empty caption")
    rows = []
    for part in text.split(" and "):
        match = _OBJECT_RE.match(part)
        if match is None:
            raise ValueError(f"cannot parse object phrase {part!r} in caption {caption!r}")
        x_cell, y_cell = _PHRASE_TO_CELL[match["pos"]]
        rows.append(
            (SHAPES.index(match["shape"]), COLORS.index(match["color"]), SIZES.index(match["size"]), x_cell, y_cell)
        )
    rows = np.array(rows, dtype=np.int32)
    try:
        _check_attributes(rows)
    except ValueError as err:
        raise ValueError(f"caption {caption!r} is inconsistent: {err}") from None
    rows = canonical(rows)
    return rows if max_objects is None else pad_attributes(rows, max_objects)


# --- Records ------------------------------------------------------------------------------------
def sample_attributes(rng: np.random.Generator, max_objects: int) -> np.ndarray:
    """Draw 1..max_objects objects in distinct cells, rows in reading order."""
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    rows = np.stack(
        [
            rng.integers(0, len(SHAPES), count),
            rng.integers(0, len(COLORS), count),
            rng.integers(0, len(SIZES), count),
            cells % GRID,
            cells // GRID,
        ],
        axis=1,
    ).astype(np.int32)
    return canonical(rows)


def generate_record(seed: int, split: str, index: int, image_size: int = 32, max_objects: int = 3) -> dict:
    """Record `index` of `split`: image, caption, attributes, label (-1) and index.

    Re-draws (from the same per-record RNG) until the attribute set hashes to `split`.
    """
    if not 1 <= max_objects <= GRID * GRID:
        raise ValueError(f"max_objects={max_objects} must be in [1, {GRID * GRID}]")
    if index < 0:
        raise ValueError(f"record index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), split_id(split), int(index)])
    for _ in range(_MAX_REDRAWS):
        rows = sample_attributes(rng, max_objects)
        if split_of_attributes(rows) == split:
            break
    else:  # pragma: no cover - probability ~0.9**10000
        raise RuntimeError(f"no attribute set for split {split!r} after {_MAX_REDRAWS} draws")
    jitter = rng.uniform(-1.0, 1.0, size=(len(rows), 2))
    return {
        "image": render(rows, image_size, jitter),
        "caption": caption_from_attributes(rows),
        "attributes": pad_attributes(rows, max_objects),
        "label": np.int32(-1),
        "index": np.int64(index),
    }
