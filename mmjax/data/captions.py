"""Captions longer than `data.max_caption_len` tokens: truncate at a word boundary, drop, or error.

Why a pass over the split: `drop` changes which records a split has, and a random-access dataset
needs its length up front, so the kept indices are found once by encoding every caption (captions
only; images are not decoded). The same pass counts what `truncate` shortens, so both are
reported when training starts.
"""
from __future__ import annotations

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


def scan(tokenizer, captions, max_len: int, policy: str, split: str = "") -> tuple[np.ndarray, dict]:
    """(indices of the records kept, counts) for a sequence of captions under `policy`."""
    if policy not in POLICIES:
        raise ValueError(f"data.long_captions={policy!r} must be one of {POLICIES}")
    kept, long = [], 0
    for i in range(len(captions)):
        try:
            ids, too_long = fit_caption(tokenizer, captions[i], max_len, policy)
        except ValueError as e:
            raise ValueError(f"split {split!r} record {i}: {e}") from None
        long += int(too_long)
        if ids is not None:
            kept.append(i)
    counts = {"records": len(captions), "too_long": long,
              "truncated": long if policy == "truncate" else 0,
              "dropped": long if policy == "drop" else 0}
    if long:
        logging.info("split %s: %d of %d captions exceed data.max_caption_len=%d tokens: %s "
                     "(data.long_captions)", split, long, len(captions), max_len,
                     "truncated at a word" if policy == "truncate" else "dropped")
    return np.asarray(kept, np.int64), counts
