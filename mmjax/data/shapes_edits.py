"""Embedded edit dataset (`data.name="shapes_edits"`): chains of one-change edits of a shapes image.

Why: interleaved multi-image documents (Chameleon / ANOLE style, image editing) need data where the
*second* image is fully determined by the first and a short instruction, so a rule checker can
score a generated edit from the pixels (`mmjax.evals.edits`). Every image is drawn by the shapes
renderer (`mmjax.data.shapes.render`) from attributes; an edit changes exactly one object (move,
recolour, resize, add, remove) and keeps every other object's attributes *and* jitter, so the
untouched objects are pixel-identical between the two images.

Storage (flat, so the tokenizer, tokenize stage and SentencePiece run unchanged on it): chain `c`
of a split is `CHAIN_IMAGES` consecutive records `c * CHAIN_IMAGES + k`, k = 0..CHAIN_EDITS, each a
contract record (docs/INTERFACES.md):
- `image`, `attributes`: image k of the chain and its objects;
- `caption`: for k = 0 the shapes caption of the first image; for k >= 1 the instruction that
  turns image k-1 into image k ("move the small red circle at the top left to the bottom right");
- `label`: k, the image's place in its chain.
The packer (mmjax.data.edit_packing) cuts documents `A, instr, B[, instr, C ...]` of 1..CHAIN_EDITS
edits out of a chain.

Determinism and splits: chain `c` is a pure function of (seed, split, c) (its own RNG stream).
Splits are disjoint by the *first image's* attribute set (`shapes.split_of_attributes`, as the
shapes set): a test chain never starts from a composition a training chain starts from. Later
images of a chain may coincide with images of other splits (one edit away), which is the point of
editing: the (image, instruction) pair is new, not every image.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from mmjax.data import shapes

CHAIN_EDITS = 3  # Edits stored per chain: documents chain 1..CHAIN_EDITS of them.
CHAIN_IMAGES = CHAIN_EDITS + 1  # Records per chain.
OPS = ("move", "recolor", "resize", "add", "remove")
_STREAM = 0x45444954  # "EDIT": keeps chain RNGs apart from the shapes records' streams
_MAX_REDRAWS = 10_000

# Where an object goes ("move ... to the top left"): position phrases with "to the".
TARGET_PHRASES = {
    (0, 0): "to the top left", (1, 0): "to the top", (2, 0): "to the top right",
    (0, 1): "to the left", (1, 1): "to the center", (2, 1): "to the right",
    (0, 2): "to the bottom left", (1, 2): "to the bottom", (2, 2): "to the bottom right",
}


def num_records(num_chains: int) -> int:
    """Records of a split holding `num_chains` chains."""
    return int(num_chains) * CHAIN_IMAGES


# ---- instructions ----------------------------------------------------------------------------
def instruction(op: str, before: np.ndarray, after: np.ndarray) -> str:
    """The English instruction of one edit; `before`/`after` are the edited object's rows
    (`before` None for add, `after` None for remove)."""
    if op == "add":
        return "add " + shapes.describe_object(after)
    target = "the " + shapes.describe_object(before)[2:]  # "a large ..." -> "the large ..."
    if op == "remove":
        return f"remove {target}"
    if op == "move":
        return f"move {target} {TARGET_PHRASES[(int(after[3]), int(after[4]))]}"
    if op == "recolor":
        return f"make {target} {shapes.COLORS[int(after[1])]}"
    if op == "resize":
        return f"make {target} {shapes.SIZES[int(after[2])]}"
    raise ValueError(f"unknown edit op {op!r}; expected one of {OPS}")


_PHRASE_TO_CELL = {p: c for c, p in shapes.POSITION_PHRASES.items()}
_TARGET_TO_CELL = {p: c for c, p in TARGET_PHRASES.items()}
_alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
_OBJ = r"(?P<size>{}) (?P<color>{}) (?P<shape>{}) (?P<pos>{})".format(
    _alt(shapes.SIZES), _alt(shapes.COLORS), _alt(shapes.SHAPES), _alt(_PHRASE_TO_CELL))
_PATTERNS = {
    "add": re.compile(rf"^add an? {_OBJ}$"),
    "remove": re.compile(rf"^remove the {_OBJ}$"),
    "move": re.compile(rf"^move the {_OBJ} (?P<to>{_alt(_TARGET_TO_CELL)})$"),
    "recolor": re.compile(rf"^make the {_OBJ} (?P<new_color>{_alt(shapes.COLORS)})$"),
    "resize": re.compile(rf"^make the {_OBJ} (?P<new_size>{_alt(shapes.SIZES)})$"),
}


def parse_instruction(text: str) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Inverse of `instruction`: (op, before row or None, after row or None); ValueError for
    text outside the grammar."""
    text = " ".join(str(text).strip().lower().rstrip(".").split())
    for op, pattern in _PATTERNS.items():
        m = pattern.match(text)
        if m is None:
            continue
        x, y = _PHRASE_TO_CELL[m["pos"]]
        row = np.array([shapes.SHAPES.index(m["shape"]), shapes.COLORS.index(m["color"]),
                        shapes.SIZES.index(m["size"]), x, y], np.int32)
        if op == "add":
            return op, None, row
        if op == "remove":
            return op, row, None
        new = row.copy()
        if op == "move":
            new[3:] = _TARGET_TO_CELL[m["to"]]
        elif op == "recolor":
            new[1] = shapes.COLORS.index(m["new_color"])
        else:
            new[2] = shapes.SIZES.index(m["new_size"])
        return op, row, new
    raise ValueError(f"not an edit instruction: {text!r}")


def apply_edit(attributes: np.ndarray, text: str) -> np.ndarray:
    """The attributes (canonical rows) after the instruction `text`; ValueError when the
    instruction names an object that is not there, or its result is impossible."""
    rows = shapes.canonical(attributes)
    op, before, after = parse_instruction(text)
    keep = np.ones(len(rows), bool)
    if before is not None:
        hit = np.all(rows == before, axis=1)
        if not hit.any():
            raise ValueError(f"instruction {text!r} names an object not in {rows.tolist()}")
        keep &= ~hit
    out = rows[keep]
    if after is not None:
        out = np.concatenate([out, after[None]])
    cells = out[:, 3] * shapes.GRID + out[:, 4]
    if len(out) == 0 or len(np.unique(cells)) != len(cells):
        raise ValueError(f"instruction {text!r} leaves an impossible image: {out.tolist()}")
    return shapes.canonical(out)


# ---- chains ----------------------------------------------------------------------------------
def _free_cells(rows: np.ndarray) -> list[tuple[int, int]]:
    used = {(int(r[3]), int(r[4])) for r in rows}
    return [(x, y) for y in range(shapes.GRID) for x in range(shapes.GRID) if (x, y) not in used]


def _feasible_ops(rows: np.ndarray, max_objects: int) -> list[str]:
    """Ops that keep 1..max_objects objects in distinct cells."""
    free = bool(_free_cells(rows))
    ok = {"move": free, "recolor": True, "resize": True,
          "add": free and len(rows) < max_objects, "remove": len(rows) > 1}
    return [op for op in OPS if ok[op]]


def draw_edit(rng: np.random.Generator, rows: np.ndarray, jitter: np.ndarray, max_objects: int):
    """One random feasible edit of (rows [k, 5], jitter [k, 2]) -> (op, new rows, new jitter,
    instruction). Untouched objects keep their row and jitter; a moved or added object gets a
    fresh jitter, a recoloured or resized one keeps its own."""
    ops = _feasible_ops(rows, max_objects)
    op = ops[int(rng.integers(len(ops)))]
    if op == "add":
        cells = _free_cells(rows)
        x, y = cells[int(rng.integers(len(cells)))]
        new = np.array([rng.integers(len(shapes.SHAPES)), rng.integers(len(shapes.COLORS)),
                        rng.integers(len(shapes.SIZES)), x, y], np.int32)
        rows2 = np.concatenate([rows, new[None]])
        jitter2 = np.concatenate([jitter, rng.uniform(-1, 1, (1, 2))])
        return op, rows2, jitter2, instruction(op, None, new)
    i = int(rng.integers(len(rows)))
    before = rows[i]
    if op == "remove":
        keep = np.arange(len(rows)) != i
        return op, rows[keep], jitter[keep], instruction(op, before, None)
    after, jitter2 = before.copy(), jitter.copy()
    if op == "move":
        cells = _free_cells(rows)
        after[3:] = cells[int(rng.integers(len(cells)))]
        jitter2[i] = rng.uniform(-1, 1, 2)
    elif op == "recolor":
        after[1] = (before[1] + 1 + rng.integers(len(shapes.COLORS) - 1)) % len(shapes.COLORS)
    else:
        after[2] = 1 - before[2]
    rows2 = rows.copy()
    rows2[i] = after
    return op, rows2, jitter2, instruction(op, before, after)


@functools.lru_cache(maxsize=64)
def generate_chain(seed: int, split: str, chain: int, image_size: int = 32,
                   max_objects: int = 3) -> tuple[dict, ...]:
    """The CHAIN_IMAGES records of chain `chain` of `split` (see the module docstring).

    The first image re-draws from the chain's RNG until its attribute set hashes to `split`.
    Cached: the builder asks for the records of one chain one after another.
    """
    if not 1 <= max_objects <= shapes.GRID ** 2:
        raise ValueError(f"max_objects={max_objects} must be in [1, {shapes.GRID ** 2}]")
    if chain < 0:
        raise ValueError(f"chain index must be >= 0, got {chain}")
    rng = np.random.default_rng([int(seed), shapes.split_id(split), int(chain), _STREAM])
    for _ in range(_MAX_REDRAWS):
        rows = shapes.sample_attributes(rng, max_objects)
        if shapes.split_of_attributes(rows) == split:
            break
    else:  # pragma: no cover - probability ~0.9**10000
        raise RuntimeError(f"no attribute set for split {split!r} after {_MAX_REDRAWS} draws")
    jitter = rng.uniform(-1.0, 1.0, size=(len(rows), 2))
    texts = [shapes.caption_from_attributes(rows)]
    states = [(rows, jitter)]
    for _ in range(CHAIN_EDITS):
        _, rows, jitter, text = draw_edit(rng, rows, jitter, max_objects)
        texts.append(text)
        states.append((rows, jitter))
    out = []
    for k, ((rows, jitter), text) in enumerate(zip(states, texts)):
        out.append({
            "image": shapes.render(rows, image_size, jitter),
            "caption": text,
            "attributes": shapes.pad_attributes(shapes.canonical(rows), max_objects),
            "label": np.int32(k),
            "index": np.int64(chain * CHAIN_IMAGES + k),
        })
    return tuple(out)


def generate_record(seed: int, split: str, index: int, image_size: int = 32,
                    max_objects: int = 3) -> dict:
    """Record `index` of `split`: image `index % CHAIN_IMAGES` of chain `index // CHAIN_IMAGES`."""
    if index < 0:
        raise ValueError(f"record index must be >= 0, got {index}")
    chain, k = divmod(int(index), CHAIN_IMAGES)
    return dict(generate_chain(int(seed), split, chain, int(image_size), int(max_objects))[k])
