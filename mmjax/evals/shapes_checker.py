"""Deterministic rule checker for the shapes dataset (GenEval-style text->image scoring).

Why rules and not a learned detector: the shapes vocabulary is tiny and drawn in a fixed palette,
so pixels can be read back exactly; a checker that scores 100% on ground truth turns "does the
generated image obey its prompt?" into a number with no model in the loop.

Reading an image:
1. colour: every pixel takes the nearest palette colour, the background included;
2. objects: 4-connected components per colour (scipy.ndimage.label), specks below
   `min_area_fraction` of the smallest true object are ignored;
3. position: the grid cell of the component's centroid;
4. size: the bounding-box extent relative to the cell, split half-way between the two true sizes;
5. shape: the shape whose rendered template (searched over sub-pixel centres and extents around the
   bounding box) has the highest IoU with the component.
Requested objects are then matched one-to-one to detections (Hungarian, maximising agreeing
attributes), so per-attribute accuracies are well defined even for wrong images.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage, optimize

from mmjax.data import shapes
from mmjax.evals.intervals import rate_with_interval

ATTRIBUTES = ("shape", "color", "size", "position")
# Sub-pixel search of the template fit, in pixels (centre) and as offsets of the half-extent.
_CENTRE_OFFSETS = np.linspace(-0.5, 0.5, 5)
_EXTENT_OFFSETS = np.linspace(-0.5, 0.5, 5)
_SIZE_SPLIT = (shapes.HALF_EXTENT[0] + shapes.HALF_EXTENT[1])  # bbox side / cell between sizes


def quantize_colors(image: np.ndarray) -> np.ndarray:
    """int [H, W] palette id per pixel: -1 background, else index into shapes.COLORS."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    colors = np.concatenate([shapes.BACKGROUND[None], shapes.PALETTE]).astype(np.int32)
    dist = ((image.astype(np.int32)[:, :, None, :] - colors[None, None]) ** 2).sum(-1)
    return np.argmin(dist, axis=-1) - 1


def classify_shape(component: np.ndarray, pad: int = 2) -> int:
    """Shape id whose template best overlaps a boolean component mask.

    The template of each shape is rendered over the component's bounding box (padded by `pad`
    background pixels) for a grid of sub-pixel centres and half-extents around the box's; the
    shape with the highest IoU wins. Fill ratio alone is ambiguous for small rasterised shapes.
    """
    ys, xs = np.nonzero(component)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(component[y0:y1, x0:x1], pad).reshape(-1).astype(np.int32)
    templates, areas = _templates(int(y1 - y0), int(x1 - x0), pad)
    inter = templates @ crop  # [shapes, candidates]
    iou = inter / np.maximum(areas + crop.sum() - inter, 1)
    return int(np.argmax(iou.max(axis=-1)))


@functools.lru_cache(maxsize=None)
def _templates(height: int, width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [shapes, candidates, pixels] templates, their [shapes, candidates] areas) over a
    `height` x `width` bounding box padded by `pad`.

    Why cached: the candidates depend only on the box's size (centres and half-extents are set
    relative to it), and a checker run meets a few dozen sizes, so each is rendered once rather
    than once per detected object (most of the checker's time before).
    """
    cy, cx = height / 2 + pad, width / 2 + pad
    # Candidate grid on the leading axes [centre_y, centre_x, extent], pixels on the last two.
    oy = _CENTRE_OFFSETS[:, None, None, None, None]
    ox = _CENTRE_OFFSETS[None, :, None, None, None]
    r = (max(height, width) / 2 + _EXTENT_OFFSETS)[None, None, :, None, None]
    dy = (np.arange(height + 2 * pad) + 0.5)[:, None] - cy - oy
    dx = (np.arange(width + 2 * pad) + 0.5)[None, :] - cx - ox
    pixels = (height + 2 * pad) * (width + 2 * pad)
    templates = np.stack([
        np.broadcast_to(shapes.shape_mask(shape, dx, dy, r),
                        np.broadcast_shapes(dx.shape, dy.shape, r.shape)).reshape(-1, pixels)
        for shape in range(len(shapes.SHAPES))]).astype(np.int32)
    return templates, templates.sum(-1)


def detect_objects(image: np.ndarray, min_area_fraction: float = 0.3) -> np.ndarray:
    """int32 [m, 5] detections (shape, color, size, x_cell, y_cell) in reading order."""
    size = image.shape[0]
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square image, got shape {image.shape}")
    cell = size / shapes.GRID
    # Smallest true object: a small triangle, half its bounding box.
    min_area = min_area_fraction * 0.5 * (2 * shapes.HALF_EXTENT[0] * cell) ** 2
    labels = quantize_colors(image)
    found = []
    for color in range(len(shapes.COLORS)):
        components, count = ndimage.label(labels == color)
        areas = np.bincount(components.reshape(-1), minlength=count + 1)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            if areas[k] < min_area:
                continue
            component = components[box] == k
            ys, xs = np.nonzero(component)
            ys, xs = ys + box[0].start, xs + box[1].start
            extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / cell
            x_cell = min(int((xs.mean() + 0.5) // cell), shapes.GRID - 1)
            y_cell = min(int((ys.mean() + 0.5) // cell), shapes.GRID - 1)
            found.append((classify_shape(component), color, int(extent > _SIZE_SPLIT), x_cell, y_cell))
    rows = np.array(found, dtype=np.int32).reshape(-1, 5)
    return rows[np.lexsort((rows[:, 3], rows[:, 4]))]


def match_objects(requested: np.ndarray, found: np.ndarray) -> list[dict]:
    """Per requested object: which attributes its best one-to-one matched detection gets right."""
    requested = shapes.valid_rows(requested)
    found = np.asarray(found, dtype=np.int32).reshape(-1, 5)
    agree = _agreement(requested, found)  # [n, m, 4] booleans
    result = [dict.fromkeys(ATTRIBUTES + ("object",), False) for _ in requested]
    if len(requested) and len(found):
        rows, cols = optimize.linear_sum_assignment(-agree.sum(-1))
        for i, j in zip(rows, cols):
            result[i] = {name: bool(agree[i, j, a]) for a, name in enumerate(ATTRIBUTES)}
            result[i]["object"] = bool(agree[i, j].all())
    return result


def _agreement(requested: np.ndarray, found: np.ndarray) -> np.ndarray:
    """[n, m, 4] booleans: shape, color, size and (both) cell coordinates equal."""
    eq = requested[:, None, :] == found[None, :, :]
    return np.concatenate([eq[..., :3], eq[..., 3:].all(-1, keepdims=True)], axis=-1)


def check_image(image: np.ndarray, attributes: np.ndarray) -> dict:
    """Check one uint8 image against its requested attributes (int32 [k, 5], -1 padding).

    Returns {"objects": [per-object dict of shape/color/size/position/object booleans],
    "count": detections == requested, "correct": every object right and the count right,
    "detections": int32 [m, 5]}.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"check_image expects a uint8 image, got dtype {image.dtype}")
    requested = shapes.valid_rows(attributes)
    found = detect_objects(image)
    objects = match_objects(requested, found)
    count = len(found) == len(requested)
    return {
        "objects": objects,
        "count": count,
        "correct": bool(count and all(o["object"] for o in objects)),
        "detections": found,
    }


def _summarise(results: Sequence[dict]) -> dict:
    """Per-attribute accuracy over objects; count and whole-prompt accuracy over prompts; each
    with its 95% Wilson interval (`_lo`, `_hi`) and count (`_n`), and broken down by how many
    objects the prompt asks for (`prompt_acc_1obj`, ...), where the difficulty lies."""
    objects = [o for r in results for o in r["objects"]]
    out = {}
    for name in ATTRIBUTES + ("object",):
        out.update(rate_with_interval(f"{name}_acc", [o[name] for o in objects]))
    out.update(rate_with_interval("count_acc", [r["count"] for r in results]))
    out.update(rate_with_interval("prompt_acc", [r["correct"] for r in results]))
    sizes = sorted({len(r["objects"]) for r in results})
    for k in sizes:
        group = [r for r in results if len(r["objects"]) == k]
        out.update(rate_with_interval(f"prompt_acc_{k}obj", [r["correct"] for r in group]))
        out.update(rate_with_interval(f"count_acc_{k}obj", [r["count"] for r in group]))
    return out


def score_batch(images: np.ndarray, attributes_batch: np.ndarray) -> dict:
    """Accuracies over a batch of uint8 [B, H, W, 3] images and int32 [B, k, 5] prompts.

    Keys: shape_acc, color_acc, size_acc, position_acc, object_acc (all four right), count_acc,
    prompt_acc (GenEval's whole-prompt accuracy).
    """
    if len(images) != len(attributes_batch):
        raise ValueError(f"{len(images)} images but {len(attributes_batch)} attribute sets")
    return _summarise([check_image(img, attrs) for img, attrs in zip(images, attributes_batch)])


def caption_accuracy(generated_captions: Sequence[str], attributes_batch: np.ndarray) -> dict:
    """Score generated captions against true attributes via `shapes.parse_caption`.

    A caption that does not parse counts as wrong everywhere. Keys: the per-attribute and
    object accuracies of `score_batch`, count_acc, exact_acc (identical attribute set) and
    parse_rate.
    """
    if len(generated_captions) != len(attributes_batch):
        raise ValueError(f"{len(generated_captions)} captions but {len(attributes_batch)} attribute sets")
    results, parsed = [], 0
    for caption, attrs in zip(generated_captions, attributes_batch):
        requested = shapes.canonical(attrs)
        try:
            said = shapes.parse_caption(caption)
            parsed += 1
        except ValueError:
            said = np.zeros((0, 5), np.int32)
        exact = said.shape == requested.shape and bool(np.all(said == requested))
        results.append({"objects": match_objects(requested, said), "count": len(said) == len(requested),
                        "correct": exact})
    out = _summarise(results)
    for key in [k for k in out if k.startswith("prompt_acc")]:
        out[key.replace("prompt_acc", "exact_acc", 1)] = out.pop(key)
    out["parse_rate"] = parsed / max(len(results), 1)
    return out
