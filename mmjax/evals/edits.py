"""Rule-checker scores of image edits (data.name="shapes_edits"): did the named change happen, and
only it?

For one edit A --instruction--> B with true attribute sets `before` (A) and `after` (B):
- `edit_acc`: the generated image read back by the shapes rule checker
  (`shapes_checker.check_image`) is exactly `after`: every object right and no extra one. That is
  "the named change happened and nothing else changed" (a missing, extra or altered object fails).
- `preserve_acc`: every *untouched* object (the rows of A that are also rows of B: all of A but the
  edited object) is found intact (shape, colour, size and cell) in the generated image, whatever
  happened to the edited one. Counted over the prompts that HAVE an untouched object (an edit of
  a one-object image has none, and a vacuous pass would inflate the rate); `preserve_object_acc`
  is the same per untouched object.
- `edit_acc_<op>`: edit_acc per kind of edit (move, recolor, resize, add, remove).
Each rate carries its Wilson 95% interval (`_lo`, `_hi`) and count (`_n`), over prompts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.data import shapes, shapes_edits
from mmjax.evals import shapes_checker
from mmjax.evals.intervals import rate_with_interval


def untouched_objects(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Rows of `before` that are unchanged in `after` (canonical order)."""
    b, a = shapes.canonical(before), shapes.canonical(after)
    keep = [row for row in b if np.any(np.all(a == row, axis=1))]
    return np.asarray(keep, np.int32).reshape(-1, 5)


def check_edit(image: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict:
    """{"edit": bool, "preserved": [bool per untouched object], "detections"} for one image."""
    result = shapes_checker.check_image(image, after)
    kept = untouched_objects(before, after)
    found = result["detections"]
    preserved = [bool(o["object"]) for o in shapes_checker.match_objects(kept, found)]
    return {"edit": result["correct"], "preserved": preserved, "detections": found}


def score_edits(images: np.ndarray, before: np.ndarray, after: np.ndarray,
                instructions: Sequence[str]) -> dict:
    """edit_acc, preserve_acc, preserve_object_acc and edit_acc_<op> (module docstring) over
    uint8 images [B, H, W, 3] with true attributes before/after [B, k, 5]."""
    if not len(images) == len(before) == len(after) == len(instructions):
        raise ValueError(f"{len(images)} images, {len(before)}/{len(after)} attribute sets and "
                         f"{len(instructions)} instructions must agree")
    results = [check_edit(img, b, a) for img, b, a in zip(images, before, after)]
    out = {}
    out.update(rate_with_interval("edit_acc", [r["edit"] for r in results]))
    out.update(rate_with_interval("preserve_acc", [all(r["preserved"]) for r in results
                                                   if r["preserved"]]))
    out.update(rate_with_interval("preserve_object_acc", [p for r in results for p in r["preserved"]]))
    ops = [shapes_edits.parse_instruction(t)[0] for t in instructions]
    for op in shapes_edits.OPS:
        hits = [r["edit"] for r, o in zip(results, ops) if o == op]
        if hits:
            out.update(rate_with_interval(f"edit_acc_{op}", hits))
    return out
