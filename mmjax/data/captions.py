"""Captions longer than `data.max_caption_len` tokens: truncate at a word boundary, drop, or error.

Why a pass over the split: `drop` changes which records a split has, and a random-access dataset
needs its length up front, so the kept indices are found once by encoding every caption (captions
only; images are not decoded). The same pass counts what `truncate` shortens, so both are
reported when training starts, and it keeps the ids it fitted (`FittedCaptions`), so training
never reads a record or runs SentencePiece again.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from mmjax.choices import CHOICES

POLICIES = CHOICES["data.long_captions"]


def truncate_to_fit(tokenizer, caption: str, max_len: int) -> list[int]:
    """Ids of the longest word prefix of `caption` that fits in `max_len` tokens.

    Binary search over the number of words (token count grows with the prefix). A first word
    that alone needs more than `max_len` tokens is cut at `max_len` tokens.
    """
    words = caption.split()
    lo, hi = 0, len(words)  # invariant: prefix of lo words fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) <= max_len:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return list(tokenizer.encode(caption))[:max_len]
    return list(tokenizer.encode(" ".join(words[:lo])))


def fit_caption(tokenizer, caption: str, max_len: int, policy: str) -> tuple[list[int] | None, bool]:
    """(ids or None when dropped, whether the caption was too long) under `policy`."""
    ids = tokenizer.encode(caption)
    if len(ids) <= max_len:
        return list(ids), False
    if policy == "error":
        raise ValueError(f"caption {caption!r} has {len(ids)} tokens > data.max_caption_len="
                         f"{max_len} (data.long_captions='error'); raise data.max_caption_len "
                         "(and model.max_seq_len) or set data.long_captions to truncate or drop")
    if policy == "drop":
        return None, True
    return truncate_to_fit(tokenizer, caption, max_len), True


@dataclasses.dataclass(frozen=True)
class FittedCaptions:
    """The fitted ids of every kept caption, concatenated: `fitted[j]` is kept caption j's.

    Why keep them: training reads each caption once per epoch, and reading its record again (the
    image is decoded with it) and re-encoding it was about half the cost of a packed row on the
    demo (1.4-1.8 ms per row before, 0.86 ms after: bench/results/data_loading.json). One flat
    array costs the ids' bytes, no per-caption object.
    """

    flat: np.ndarray  # int32 ids of the kept captions, one after another
    offsets: np.ndarray  # int64 [kept + 1]: caption j is flat[offsets[j]:offsets[j + 1]]

    @classmethod
    def from_lists(cls, ids: list[list[int]]) -> "FittedCaptions":
        offsets = np.zeros(len(ids) + 1, np.int64)
        offsets[1:] = np.cumsum([len(i) for i in ids])
        flat = np.fromiter((t for i in ids for t in i), np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j: int) -> np.ndarray:
        return self.flat[self.offsets[j]:self.offsets[j + 1]]


@dataclasses.dataclass(frozen=True)
class Scan:
    """What `scan` found: the kept record indices, their fitted ids and the counts it logs."""

    kept: np.ndarray  # int64 record indices, in order
    fitted: FittedCaptions  # fitted[j]: the ids of record kept[j]'s caption
    counts: dict


def scan(tokenizer, captions, max_len: int, policy: str, split: str = "") -> Scan:
    """The records kept under `policy` from a sequence of captions, with their ids and counts."""
    if policy not in POLICIES:
        raise ValueError(f"data.long_captions={policy!r} must be one of {POLICIES}")
    kept, fitted, long = [], [], 0
    for i in range(len(captions)):
        try:
            ids, too_long = fit_caption(tokenizer, captions[i], max_len, policy)
        except ValueError as e:
            raise ValueError(f"split {split!r} record {i}: {e}") from None
        long += int(too_long)
        if ids is not None:
            kept.append(i)
            fitted.append(ids)
    counts = {"records": len(captions), "too_long": long,
              "truncated": long if policy == "truncate" else 0,
              "dropped": long if policy == "drop" else 0}
    if long:
        logging.info("split %s: %d of %d captions exceed data.max_caption_len=%d tokens: %s "
                     "(data.long_captions)", split, long, len(captions), max_len,
                     "truncated at a word" if policy == "truncate" else "dropped")
    return Scan(np.asarray(kept, np.int64), FittedCaptions.from_lists(fitted), counts)
