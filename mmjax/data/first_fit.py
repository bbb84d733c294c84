"""First-fit packing of caption/image documents: as many documents per row as their lengths allow.

Why: the fixed packer (`packing.PackedDataset` with data.packing="fixed") puts k = seq_len //
(longest possible document) documents in every row, so a row is padded wherever captions are
shorter than data.max_caption_len. The demo's captions fill its 96-token rows to 73%, and
padding is work the step executes but nobody counts (bench/results/step_time_demo_rows.json).
Here the documents of a whole direction group of rows are placed first-fit, row by row, so short
documents share a row with long ones.

Static shapes stay static: each group of `group_rows` rows obeys bounds fixed by the config,
which the MoT buckets and the heads' gathers are sized from:
  - every row holds at most seq_len tokens;
  - the group holds at most group_rows x `image_slots` image tokens and group_rows x (seq_len -
    image_slots) text tokens: the MoT image and text buckets (mot.make_bucket_routing sorts
    whole groups, ModelConfig.bucket_rows);
  - the group holds at most `t2i_per_group` text->image documents: the image heads' capacity
    (mmjax/targets.py), ceil(t2i_prob x the most documents the image bucket admits).
A document that breaks a bound is passed over (up to `lookahead` of them); then the group is
closed and the passed-over documents open the next one, so every example is packed exactly once.

The plan (which examples each row holds) is computed once from the examples' lengths and
directions, both pure functions of the example index, so a row is still a pure function of its
index and grain's iterator checkpoints stay exact.
"""
from __future__ import annotations

import collections
import math

import numpy as np

from mmjax.layout import SPECIAL_TOKENS, document_length, longest_document


def image_slot_range(seq_len: int, max_caption_len: int, num_image_tokens: int) -> tuple[int, int]:
    """(fewest, most) image slots per row that leave room for one longest document: its image
    in the image bucket and its text (caption and special tokens) in the rest of the row."""
    longest = longest_document(max_caption_len, num_image_tokens)
    return int(num_image_tokens), int(seq_len) - (longest - int(num_image_tokens))


def default_image_slots(seq_len: int, max_caption_len: int, num_image_tokens: int) -> int:
    """Image tokens per row (the image bucket) when data.row_image_slots is 0: the share of a
    document that is image when its caption is half of max_caption_len, the middle of the
    range the lengths can take, kept inside image_slot_range."""
    typical = document_length(max(int(max_caption_len), 1) / 2, int(num_image_tokens))
    fewest, most = image_slot_range(seq_len, max_caption_len, num_image_tokens)
    return min(max(fewest, round(int(seq_len) * int(num_image_tokens) / typical)), most)


def check_image_slots(seq_len: int, max_caption_len: int, num_image_tokens: int,
                      image_slots: int) -> None:
    """ValueError unless one longest document fits a row and its buckets."""
    longest = longest_document(max_caption_len, num_image_tokens)
    if longest > seq_len:
        raise ValueError(f"one document ({max_caption_len} caption + {num_image_tokens} image + "
                         f"{SPECIAL_TOKENS} special tokens = {longest}) is longer than "
                         f"seq_len={seq_len}")
    fewest, most = image_slot_range(seq_len, max_caption_len, num_image_tokens)
    if not fewest <= image_slots <= most:
        raise ValueError(f"row_image_slots={image_slots} must leave room for one longest document: "
                         f"between {fewest} image and {seq_len} - {seq_len - most} text tokens")


def t2i_per_group(t2i_prob: float, group_rows: int, image_slots: int,
                  num_image_tokens: int) -> int:
    """Most text->image documents a group holds: ceil(t2i_prob x the documents its image bucket
    admits). The directions are stratified (packing.draw_direction), so a group's share rarely
    exceeds t2i_prob, and the packer passes over a text->image document that would."""
    documents = int(group_rows) * int(image_slots) // int(num_image_tokens)
    return max(1, math.ceil(round(float(t2i_prob) * documents, 9)))


def row_text_targets(seq_len: int, max_caption_len: int, num_image_tokens: int) -> int:
    """Most text targets one row holds: k documents hold at most k x (longest - image - 1) (each
    document's tokens but its image and first token) and at most seq_len - k x (image + 1)."""
    longest = longest_document(max_caption_len, num_image_tokens)
    shortest = document_length(1, int(num_image_tokens))
    per_doc, rest = longest - num_image_tokens - 1, num_image_tokens + 1
    return max(min(k * per_doc, seq_len - k * rest) for k in range(1, seq_len // shortest + 1))


def plan_rows(lengths: np.ndarray, t2i: np.ndarray, *, seq_len: int, group_rows: int,
              num_image_tokens: int, image_slots: int, t2i_cap: int,
              lookahead: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_starts [R + 1], examples [N]): row r holds examples[row_starts[r]:row_starts[r + 1]],
    R a multiple of group_rows (the last group's rows may be empty).

    lengths [N]: each document's tokens; t2i [N]: whether it is text->image. Documents are taken
    in index order into the open group, each into the first of its rows with room; one that breaks
    a bound is passed over, and after `lookahead` + 1 of those the group closes.
    """
    lengths = np.asarray(lengths, np.int64)
    t2i = np.asarray(t2i, bool)
    if lengths.ndim != 1 or t2i.shape != lengths.shape:
        raise ValueError(f"lengths {lengths.shape} and t2i {t2i.shape} must be [N] alike")
    if len(lengths) and (lengths.max() > seq_len or lengths.max() - num_image_tokens
                         > group_rows * (seq_len - image_slots)):
        raise ValueError(f"a document of {lengths.max()} tokens does not fit a group of "
                         f"{group_rows} rows of {seq_len} with {image_slots} image slots each")
    image_room = group_rows * image_slots
    text_room = group_rows * (seq_len - image_slots)
    pending = collections.deque(range(len(lengths)))
    rows: list[list[int]] = []
    while pending:
        group = [[] for _ in range(group_rows)]
        used = [0] * group_rows
        images = texts = generated = 0
        passed: list[int] = []
        while pending and len(passed) <= lookahead:
            i = pending.popleft()
            n, gen = int(lengths[i]), bool(t2i[i])
            row = -1
            if (images + num_image_tokens <= image_room and texts + n - num_image_tokens <= text_room
                    and generated + gen <= t2i_cap):
                row = next((r for r in range(group_rows) if used[r] + n <= seq_len), -1)
            if row < 0:
                passed.append(i)
                continue
            group[row].append(i)
            used[row] += n
            images += num_image_tokens
            texts += n - num_image_tokens
            generated += gen
        if not any(group):  # cannot happen: a lone document always fits an empty group
            raise AssertionError(f"document {passed[0]} fits no empty group")
        pending.extendleft(reversed(passed))
        rows.extend(group)
    starts = np.zeros(len(rows) + 1, np.int64)
    starts[1:] = np.cumsum([len(r) for r in rows])
    examples = np.fromiter((i for r in rows for i in r), np.int64, count=int(starts[-1]))
    return starts, examples
