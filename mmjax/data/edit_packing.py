"""Packer of multi-image edit documents (data.name="shapes_edits") -> the packed batch of INTERFACES.md.

Document (mmjax/layout.edit_parts, shared with the sampler; position i predicts token i+1):
    <bos> <boi> A <eoi> instr_1 <boi> B <eoi> [instr_2 <boi> C <eoi> ...] <eos>
cut from a stored chain (mmjax.data.shapes_edits) as a window of 1..CHAIN_EDITS consecutive edits.

Masks, and why:
- A (the first image) is a *context* image: `image_block` > 0 (bidirectional inside it when
  model.image_bidirectional_context), no image loss. It is given, never generated, exactly like
  the image of an image->caption document.
- Every image after an instruction is *generated*: causal (`image_block` 0) with image loss. In a
  chain, B is also the context of instr_2 -> C, but it stays causal: at sampling time a chained B
  is produced token by token into the KV cache, so training must see it that way too; and each
  image after an instruction is an edit target, so a chain of k edits trains k edits for the
  price of one document.
- Instruction tokens carry NO text loss: which edit a user asks for is not a property of the
  image (the data draws it at random), so its likelihood would only spend capacity on guessing
  a random choice; the eval never samples instructions. This is unlike t2i captions, whose text
  loss (shared with image->caption) teaches the captioner. The structural tokens after them
  (`<boi>`, `<eoi>`, `<eos>`) keep their text loss: they are cheap and keep the layout learned.
- Instruction dropout (`objective.caption_dropout`): an instruction replaced by `<uncond>`
  (layout.uncond_caption), so the sampler's classifier-free guidance has an unconditional
  `A <uncond> -> B` stream (InstructPix2Pix's text guidance).
Everything is across-document causal through segment ids, as in the single-pair packer.

`EditPackedDataset` is random access like `packing.PackedDataset`: row r holds chains
[r*k, (r+1)*k), k = seq_len // (longest document), and each chain's window and dropout come from
an RNG keyed by (seed, example index).
"""
from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from mmjax import layout
from mmjax.data import packing
from mmjax.data.shapes_edits import CHAIN_EDITS, CHAIN_IMAGES
from mmjax.layout import IMAGE, TEXT, SpecialIds


def build_edit_document(images: Sequence[np.ndarray], codes: Sequence[np.ndarray],
                        instructions: Sequence[Sequence[int]], special: SpecialIds, *,
                        drop: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """One edit document's [n] arrays (packing.DOC_KEYS); `image_block` is a 0/1 flag here.

    images: FSQ indices per image (len(instructions) + 1 of them), codes: their [n, d] vectors,
    drop: per instruction, replace it by `<uncond>`.
    """
    if len(images) != len(instructions) + 1 or len(codes) != len(images) or len(images) < 2:
        raise ValueError(f"an edit document needs k >= 1 instructions and k + 1 images (and codes); "
                         f"got {len(instructions)}, {len(images)} and {len(codes)}")
    drop = [False] * len(instructions) if drop is None else list(drop)
    texts = [layout.uncond_caption(special) if d else list(np.asarray(t).reshape(-1))
             for t, d in zip(instructions, drop)]
    images = [np.asarray(i, np.int32).reshape(-1) for i in images]
    parts = layout.edit_parts(images, texts, special)
    modality = np.concatenate([np.full(len(p), m, np.int32) for p, m in parts])
    # Per token: which image it belongs to (-1: text) and whether it is instruction text.
    image_of = np.concatenate([np.full(len(p), (r - 1) // 4 if m == IMAGE else -1, np.int32)
                               for r, (p, m) in enumerate(parts)])
    last = len(parts) - 1  # the <eos> run (its index is also 3 mod 4)
    instr = np.concatenate([np.full(len(p), 3 <= r < last and (r - 3) % 4 == 0, bool)
                            for r, (p, _) in enumerate(parts)])
    d = np.asarray(codes[0]).reshape(len(images[0]), -1).shape[1]
    codes = np.concatenate([np.asarray(c, np.float32).reshape(len(i), d)
                            for c, i in zip(codes, images)])
    return packing.document_arrays(parts, codes, text_loss=(modality == TEXT) & ~instr,
                                   generated=image_of >= 1, context=image_of == 0)

def draw_window(seed: int, example_index: int, chain_prob: float,
                dropout: float) -> tuple[int, int, list[bool]]:
    """(first image, number of edits, per-edit dropout) of one example's document, a pure
    function of (seed, example index): one edit with probability 1 - chain_prob, else 2..
    CHAIN_EDITS (uniform); the start is uniform over the windows that fit in the chain."""
    rng = np.random.default_rng([int(seed), int(example_index), 0x57494E])
    edits = 1
    if CHAIN_EDITS > 1 and rng.random() < chain_prob:
        edits = int(rng.integers(2, CHAIN_EDITS + 1))
    start = int(rng.integers(0, CHAIN_EDITS - edits + 1))
    return start, edits, [bool(rng.random() < dropout) for _ in range(edits)]


def row_target_capacity(seq_len: int, max_text: int, num_image_tokens: int) -> tuple[int, int]:
    """(image targets, text targets) that one packed edit row can hold at most, over every window
    this packer cuts (1..CHAIN_EDITS edits): the static capacity the objective gathers the heads'
    positions to (mmjax/targets.py), as packing.row_target_capacity is for caption/image pairs.

    Why a maximum over windows: training mixes chain lengths and evaluation fixes one
    (`window`), and shorter documents pack more of them per row, so the bound must hold for the
    document length that puts the most targets in a row. Per document of e edits: e generated
    images of `num_image_tokens` image targets each, and at most every other position minus the
    first and the e + 1 images' tokens as text targets (instructions carry none; counting them
    keeps the bound simple and safe).
    """
    image = text = 0
    for edits in range(1, CHAIN_EDITS + 1):
        length = layout.edit_document_length([max(int(max_text), 1)] * edits, int(num_image_tokens))
        docs = int(seq_len) // length
        image = max(image, docs * edits * int(num_image_tokens))
        text = max(text, docs * (length - 1 - (edits + 1) * int(num_image_tokens)))
    if image == 0:
        raise ValueError(f"an edit document of one edit ({num_image_tokens} image tokens per image, "
                         f"instructions up to {max_text} tokens) is longer than seq_len={seq_len}")
    return image, text


class EditPackedDataset(packing.RowPacker):
    """Random-access packed rows of a MapDataset of tokenized chains.

    Parent elements: {"caption_ids": int [CHAIN_IMAGES, T] (padded; row k >= 1 is the
    instruction leading to image k, row 0 is unused), "caption_len": int [CHAIN_IMAGES],
    "image_indices": int [CHAIN_IMAGES, n]}. Output rows: packing.PACKED_KEYS arrays.
    `chain_prob = 0` packs single edits only; `window=(start, edits)` fixes every document's
    window (evaluation: `(0, 1)` is A, instr_1, B).
    """

    def __init__(self, parent: grain.MapDataset, *, seq_len: int, special: SpecialIds,
                 index_to_code: Callable[[np.ndarray], np.ndarray] | np.ndarray, chain_prob: float,
                 dropout: float, seed: int, window: tuple[int, int] | None = None):
        super().__init__(parent)
        if not 0.0 <= chain_prob <= 1.0 or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"chain_prob={chain_prob} and dropout={dropout} must be in [0, 1]")
        if len(parent) == 0:
            raise ValueError("cannot pack an empty dataset")
        if window is not None and not (window[1] >= 1 and 0 <= window[0] <= CHAIN_EDITS - window[1]):
            raise ValueError(f"window={window} must be (start, edits) inside a chain of {CHAIN_EDITS}")
        first = parent[0]
        ids = np.asarray(first["caption_ids"])
        self._max_text = int(ids.shape[-1])
        self._num_image = int(np.asarray(first["image_indices"]).shape[-1])
        longest = window[1] if window is not None else (CHAIN_EDITS if chain_prob > 0 else 1)
        self.max_doc_len = layout.edit_document_length([max(self._max_text, 1)] * longest,
                                                       self._num_image)
        if self.max_doc_len > seq_len:
            raise ValueError(
                f"an edit document of {longest} edit(s) ({self._num_image} image tokens per image, "
                f"instructions up to {self._max_text} tokens) has {self.max_doc_len} tokens, more "
                f"than model.max_seq_len={seq_len}")
        self.docs_per_row = seq_len // self.max_doc_len
        # What the objective's static head capacity assumes (row_target_capacity's docstring).
        self.target_capacity = row_target_capacity(seq_len, self._max_text, self._num_image)
        self.code_dim = packing.lookup_codes(index_to_code, np.zeros(1, np.int32)).shape[1]
        self._seq_len, self._special, self._index_to_code = seq_len, special, index_to_code
        self._chain_prob, self._dropout, self._seed, self._window = chain_prob, dropout, seed, window

    def document(self, example_index: int) -> dict[str, np.ndarray]:
        """The edit document built from parent chain `example_index`."""
        chain = self._parent[example_index]
        ids = np.asarray(chain["caption_ids"])
        lengths = np.asarray(chain["caption_len"]).reshape(-1)
        indices = np.asarray(chain["image_indices"])
        if ids.shape != (CHAIN_IMAGES, self._max_text) or indices.shape != (CHAIN_IMAGES, self._num_image):
            raise ValueError(f"chain {example_index}: caption_ids {ids.shape}, image_indices "
                             f"{indices.shape}; expected ({CHAIN_IMAGES}, {self._max_text}) and "
                             f"({CHAIN_IMAGES}, {self._num_image})")
        start, edits, drop = draw_window(self._seed, example_index, self._chain_prob, self._dropout)
        if self._window is not None:
            (start, edits), drop = self._window, None
        picked = range(start, start + edits + 1)
        images = [indices[k] for k in picked]
        texts = [ids[k, :int(lengths[k])] for k in picked][1:]
        codes = [packing.lookup_codes(self._index_to_code, i) for i in images]
        return build_edit_document(images, codes, texts, self._special, drop=drop)

