"""Scores of generated captions and the loss masks used for caption perplexity.

Why exact parsing rather than BLEU-like overlap: the embedded datasets have a closed caption
grammar, so a generated caption either names the right objects / digit or it does not; the
parsers in `mmjax.data` are the inverse of the caption generators and turn captions into numbers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.data import digits
from mmjax.evals import shapes_checker
from mmjax.evals.intervals import rate_with_interval


def digit_caption_accuracy(captions: Sequence[str], labels: Sequence[int]) -> dict:
    """{"digit_acc": fraction naming the right digit (+ its 95% interval), "parse_rate":
    fraction that parse at all}.

    A caption that does not parse (`digits.parse_caption` raises) counts as wrong.
    """
    if len(captions) != len(labels):
        raise ValueError(f"{len(captions)} captions but {len(labels)} labels")
    said = []
    for caption in captions:
        try:
            said.append(digits.parse_caption(caption))
        except ValueError:
            said.append(-1)
    said = np.asarray(said)
    n = max(len(said), 1)
    return {**rate_with_interval("digit_acc", said == np.asarray(labels)),
            "parse_rate": float(np.sum(said >= 0) / n)}


def caption_scores(dataset: str, captions: Sequence[str], records: Sequence[dict]) -> dict:
    """Caption metrics for the embedded datasets (shapes: per-attribute and exact accuracy;
    digits: digit accuracy); {} for datasets without a caption grammar."""
    if dataset == "shapes":
        attributes = np.stack([r["attributes"] for r in records])
        return shapes_checker.caption_accuracy(captions, attributes)
    if dataset == "digits":
        return digit_caption_accuracy(captions, [int(r["label"]) for r in records])
    return {}


def caption_only_mask(text_mask: np.ndarray, text_targets: np.ndarray,
                      structural_ids) -> np.ndarray:
    """text_mask restricted to targets that are caption tokens or <eos>.

    In an image->text document the text loss also covers `<boi>` and `<eoi>`, which the layout
    makes trivially predictable; dropping them gives the perplexity of the caption itself.
    """
    keep = ~np.isin(np.asarray(text_targets), np.asarray(list(structural_ids)))
    return (np.asarray(text_mask) * keep).astype(np.float32)
