"""Sequence packer: captions + FSQ image tokens -> the packed multimodal batch of docs/INTERFACES.md.

Pure numpy, no model imports: image tokens arrive as FSQ indices plus their code vectors (the caller
passes a lookup table or an `index_to_code` callable, so this module never needs the FSQ code).

Document layouts (mmjax/layout.py, shared with the sampler; position i predicts token i+1):
    text -> image:  <bos> caption <boi> img_1 .. img_n <eoi> <eos>   (dropped: <bos> <uncond> <boi> ...)
    image -> text:  <bos> <boi> img_1 .. img_n <eoi> caption <eos>   (the image is context)
Loss masks: text loss wherever the next token is text (caption, <boi>, <eoi>, <eos>); image loss
only where the next token is an image token of a text->image document; nothing is predicted across
documents, and the first token of a document is never a target. Context images (image->text) are
flagged `image_block`, which packing turns into the document's segment id (unique in the row).
`image_pos` is each image token's index inside its image (-1 elsewhere), for 2-D positions.

`PackedDataset` packs a grain MapDataset of tokenized examples with random access: row r holds
examples [r*k, (r+1)*k) where k = seq_len // (longest possible document), and each example's
direction and caption dropout come from RNGs keyed by (seed, example index) and (seed, group): the
directions are stratified over groups of `group_rows` consecutive rows (`draw_direction`), so a
group holds a fixed number of text->image documents up to one and the image heads need room for
only that many (`target_capacity`; the trainer shuffles rows in these groups). Rows are therefore a
pure function of their index, which keeps grain's iterator checkpoints exact. An example's direction
is fixed by its index: pack a shuffled, repeated parent to redraw it every epoch. With
`packing="first_fit"` (data.packing) a plan drawn once from the examples' lengths and directions
says which examples each row holds instead (mmjax/data/first_fit.py), so rows hold as many
documents as fit and stay a pure function of their index.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import grain
import numpy as np

from mmjax import layout
from mmjax.choices import CHOICES
from mmjax.data import first_fit
from mmjax.layout import IMAGE, SPECIAL_TOKENS, TEXT, SpecialIds, document_length, special_ids  # noqa: F401

DIRECTIONS = ("t2i", "i2t")
PACKINGS = CHOICES["data.packing"]  # see PackedDataset
# Keys of build_document's output ([n] arrays, `codes`/`code_targets` [n, d]).
DOC_KEYS = ("tokens", "codes", "modality", "positions", "text_targets", "text_mask", "code_targets",
            "index_targets", "image_mask", "image_block", "image_pos")
# Keys of a packed row (INTERFACES.md), all [seq_len] but codes/code_targets [seq_len, d].
PACKED_KEYS = ("tokens", "codes", "modality", "positions", "segment_ids", "image_block", "text_targets",
               "text_mask", "code_targets", "index_targets", "image_mask", "image_pos")


def build_document(caption_ids: Sequence[int], image_indices: np.ndarray, codes: np.ndarray, direction: str,
                   special: SpecialIds, *, drop_caption: bool = False,
                   t2i_caption_loss: bool = True) -> dict[str, np.ndarray]:
    """One document's [n] arrays (see DOC_KEYS); `image_block` is a 0/1 flag here.

    `t2i_caption_loss=False` (objective.t2i_caption_loss): a text->image document's caption (or
    <uncond>) tokens are not LM targets; its <boi>, <eoi> and <eos> still are.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if drop_caption and direction != "t2i":
        raise ValueError("caption dropout applies to t2i documents only")
    caption = np.asarray(caption_ids, dtype=np.int32).reshape(-1)
    indices = np.asarray(image_indices, dtype=np.int32).reshape(-1)
    codes = np.asarray(codes, dtype=np.float32)
    if codes.ndim != 2 or codes.shape[0] != len(indices):
        raise ValueError(f"codes must be [{len(indices)}, d] for {len(indices)} image tokens, got {codes.shape}")
    if drop_caption:  # its own marker: never the i2t prefix <bos> <boi> (see layout.py)
        caption = np.asarray(layout.uncond_caption(special), np.int32)
    template = layout.t2i_parts if direction == "t2i" else layout.i2t_parts
    parts = template(caption, indices, special)
    modality = np.concatenate([np.full(len(p), m, np.int32) for p, m in parts])
    is_image = modality == IMAGE
    generated = is_image & (direction == "t2i")
    text_loss = modality == TEXT
    if direction == "t2i" and not t2i_caption_loss:  # parts: <bos>, caption, <boi>, image, ...
        text_loss[1:1 + len(parts[1][0])] = False
    return document_arrays(parts, codes, text_loss=text_loss, generated=generated,
                           context=is_image & ~generated)


def document_arrays(parts, codes: np.ndarray, *, text_loss: np.ndarray, generated: np.ndarray,
                    context: np.ndarray) -> dict[str, np.ndarray]:
    """One document's [n] arrays (DOC_KEYS) from its layout parts (mmjax/layout.py) and per-token
    flags: `text_loss` (a text token the LM is trained to predict), `generated` (an image token
    with image loss) and `context` (an image token given as context: bidirectional block, no loss).

    Why one function for every packer: position i predicts token i + 1, and each packer (caption/
    image pairs here, edit documents in edit_packing) differs only in those three flags, so the
    shift, the code table and the key set are written once.
    """
    tokens = np.concatenate([np.asarray(p, np.int32) for p, _ in parts])
    modality = np.concatenate([np.full(len(p), m, np.int32) for p, m in parts])
    n, d = len(tokens), codes.shape[1]
    doc_codes = np.zeros((n, d), np.float32)
    doc_codes[modality == IMAGE] = codes
    next_text, next_image, next_generated = (np.append(f[1:], False)
                                             for f in (text_loss, modality == IMAGE, generated))
    shifted = np.append(tokens[1:], 0).astype(np.int32)
    code_targets = np.where(next_image[:, None], np.append(doc_codes[1:], np.zeros((1, d)), 0), 0.0)
    return {
        "tokens": tokens,
        "codes": doc_codes,
        "modality": modality,
        "positions": np.arange(n, dtype=np.int32),
        "text_targets": np.where(next_text, shifted, 0).astype(np.int32),
        "text_mask": next_text.astype(np.float32),
        "code_targets": code_targets.astype(np.float32),
        "index_targets": np.where(next_image, shifted, 0).astype(np.int32),
        "image_mask": next_generated.astype(np.float32),
        "image_block": np.asarray(context, np.int32),
        "image_pos": np.asarray(layout.image_positions(parts), np.int32),
    }

def pack_documents(docs: Sequence[dict], seq_len: int, d: int) -> dict[str, np.ndarray]:
    """Concatenate documents into one row of `seq_len` (segment ids 1.., 0 = padding)."""
    row = {key: np.zeros((seq_len, d) if key in ("codes", "code_targets") else seq_len,
                         np.float32 if key in ("codes", "code_targets", "text_mask", "image_mask") else np.int32)
           for key in PACKED_KEYS}
    row["image_pos"][:] = -1
    start = 0
    for segment, doc in enumerate(docs, start=1):
        n = len(doc["tokens"])
        if n > seq_len:
            raise ValueError(f"document of {n} tokens is longer than seq_len={seq_len}")
        if start + n > seq_len:
            raise ValueError(f"documents need {start + n}+ tokens, more than seq_len={seq_len}")
        if doc["codes"].shape[1] != d:
            raise ValueError(f"document codes have dimension {doc['codes'].shape[1]}, expected d={d}")
        span = slice(start, start + n)
        for key in DOC_KEYS:
            if key != "image_block":
                row[key][span] = doc[key]
        row["image_block"][span] = doc["image_block"] * segment
        row["segment_ids"][span] = segment
        start += n
    return row


def row_target_capacity(seq_len: int, max_caption_len: int, num_image_tokens: int) -> tuple[int, int]:
    """(image targets, text targets) that one packed row can hold at most: the static capacity the
    objective gathers the image and LM heads' positions to (mmjax/targets.py).

    Why this bound: `PackedDataset` puts a fixed k = seq_len // (longest possible document) documents
    in every row (so rows stay a pure function of their index), and a document of either direction
    has at most `num_image_tokens` image targets (only t2i documents have any) and at most
    max(max_caption_len, 1) + 3 text targets (caption or <uncond>, <boi>, <eoi>, <eos>: the document
    minus its image tokens and its first token). A bound from the shortest possible document
    (seq_len // (num_image_tokens + 4) documents) would hold for any packer but is looser when
    captions are long; this one is exact for the packer we have, which uses this same function.
    """
    longest = layout.longest_document(max_caption_len, num_image_tokens)
    if longest > seq_len:
        raise ValueError(f"one document ({max_caption_len} caption + {num_image_tokens} image + "
                         f"{SPECIAL_TOKENS} special tokens = {longest}) is longer than seq_len={seq_len}")
    docs = int(seq_len) // longest
    return docs * int(num_image_tokens), docs * (longest - int(num_image_tokens) - 1)


def row_image_capacity(seq_len: int, max_caption_len: int, num_image_tokens: int) -> int:
    """Most image tokens, context or generated, one packed row holds: the static image bucket of
    model.mot_impl "buckets" (config_validation.model_config). Every document here has exactly
    one image, so this is row_target_capacity's image bound (which counts a t2i document's
    image); an i2t document's context image takes the same room."""
    return row_target_capacity(seq_len, max_caption_len, num_image_tokens)[0]


def lookup_codes(index_to_code: Callable[[np.ndarray], np.ndarray] | np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float32 [n, d] code vectors of `indices` from a table [codebook, d] or a callable."""
    if callable(index_to_code):
        codes = np.asarray(index_to_code(np.asarray(indices)), dtype=np.float32)
    else:
        codes = np.asarray(index_to_code, dtype=np.float32)[np.asarray(indices)]
    return codes.reshape(len(indices), -1)


def t2i_split(t2i_prob: float, documents: int) -> tuple[int, float]:
    """(text->image documents a group of `documents` always holds, the chance it holds one more).

    Why stratified: the image heads run on a static capacity of target slots (mmjax/targets.py).
    With every document's direction drawn on its own, a row or batch must make room for the case
    where all are text->image; a group whose count is fixed up to one needs room for only
    ceil(t2i_prob x documents) images. The extra one is drawn with the remaining fraction, so the
    expected share of text->image documents is still exactly t2i_prob.
    """
    exact = round(float(t2i_prob) * int(documents), 9)  # 0.7 * 10 is 7.000000000000001
    whole = math.floor(exact)
    return whole, exact - whole


def group_image_targets(t2i_prob: float, documents: int, num_image_tokens: int) -> int:
    """Most image targets a group of `documents` holds: ceil(t2i_prob x documents) images."""
    whole, extra = t2i_split(t2i_prob, documents)
    return (whole + (extra > 0)) * int(num_image_tokens)


def draw_direction(seed: int, example_index: int, t2i_prob: float, caption_dropout: float,
                   group_documents: int = 1) -> tuple[str, bool]:
    """(direction, drop_caption) of one example, a pure function of (seed, example index).

    Examples [k * group_documents, (k + 1) * group_documents) form group k, which holds
    `t2i_split`'s whole count of text->image documents plus one more with the remaining chance,
    at random places in the group (one draw per group). `group_documents=1` is an independent
    draw per example. Caption dropout is drawn per example.
    """
    t2i, drop = draw_directions(seed, [example_index], t2i_prob, caption_dropout, group_documents)
    return ("t2i" if t2i[0] else "i2t"), bool(drop[0])


def draw_directions(seed: int, example_indices: Sequence[int], t2i_prob: float,
                    caption_dropout: float, group_documents: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(is text->image [n], caption dropped [n]) of many examples, as `draw_direction` draws
    them one by one: one group draw per group touched, one dropout draw per text->image example
    (what the first-fit planner needs for every example of a split)."""
    indices = np.asarray(example_indices, np.int64).reshape(-1)
    groups, places = np.divmod(indices, int(group_documents))
    whole, extra = t2i_split(t2i_prob, group_documents)
    unique, which = np.unique(groups, return_inverse=True)
    counts = np.zeros(len(unique), np.int64)
    orders = np.zeros((len(unique), int(group_documents)), np.int64)
    for k, group in enumerate(unique):
        rng = np.random.default_rng([int(seed), int(group)])
        counts[k] = whole + int(rng.random() < extra)
        orders[k] = rng.permutation(int(group_documents))
    t2i = orders[which, places] < counts[which]
    drop = np.zeros(len(indices), bool)
    if caption_dropout > 0:
        for j in np.flatnonzero(t2i):
            drop[j] = np.random.default_rng([int(seed), int(indices[j]), 1]).random() < caption_dropout
    return t2i, drop


class RowPacker(grain.MapDataset):
    """Random-access packed rows: row r packs the documents of parent examples
    [r * docs_per_row, (r + 1) * docs_per_row), so a row is a pure function of its index.

    Why a base: the pair and edit packers differ only in how one example becomes a document
    (`document`) and how many fit a row (`docs_per_row`, set with `_seq_len`, `code_dim`); the
    row indexing and packing are written here once.
    """

    group_rows = 1  # rows per direction group (PackedDataset stratifies its directions over it)
    bucket_rows = 1  # rows that share the MoT buckets' bound (ModelConfig.bucket_rows)
    fill: dict | None = None  # first_fit: real-token shares, here and under the fixed packer

    def __len__(self) -> int:
        return -(-len(self._parent) // self.docs_per_row)

    def __str__(self) -> str:
        return f"{type(self).__name__}(seq_len={self._seq_len}, docs_per_row={self.docs_per_row})"

    def row_examples(self, index: int) -> Sequence[int]:
        """The parent examples row `index` (in [0, len)) packs, in order."""
        first = index * self.docs_per_row
        return range(first, min(first + self.docs_per_row, len(self._parent)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        docs = [self.document(int(i)) for i in self.row_examples(int(index) % len(self))]
        return pack_documents(docs, self._seq_len, self.code_dim)


class PackedDataset(RowPacker):
    """Random-access packed rows of a MapDataset of tokenized examples.

    Parent elements: {"caption_ids": int [max_caption_len] (padded), "caption_len": int,
    "image_indices": int [n]}. Output rows: the PACKED_KEYS arrays of docs/INTERFACES.md.

    `packing` (data.packing): "fixed" packs docs_per_row consecutive examples per row; "first_fit"
    packs each direction group's rows as full as their lengths allow (mmjax/data/first_fit.py),
    with `image_slots` image tokens per row in a group's image bucket and up to `lookahead`
    documents passed over before a group closes. `caption_lengths` [len(parent)] spares
    first_fit reading every parent example to plan its rows.
    """

    def __init__(self, parent: grain.MapDataset, *, seq_len: int, special: SpecialIds,
                 index_to_code: Callable[[np.ndarray], np.ndarray] | np.ndarray, t2i_prob: float,
                 caption_dropout: float, seed: int, t2i_caption_loss: bool = True,
                 group_rows: int = 1, packing: str = "fixed", image_slots: int = 0,
                 lookahead: int = 16, caption_lengths: np.ndarray | None = None):
        super().__init__(parent)
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r} must be one of {PACKINGS}")
        if int(group_rows) < 1:
            raise ValueError(f"group_rows={group_rows} must be >= 1")
        if not 0.0 <= t2i_prob <= 1.0 or not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"t2i_prob={t2i_prob} and caption_dropout={caption_dropout} must be in [0, 1]")
        if len(parent) == 0:
            raise ValueError("cannot pack an empty dataset")
        first = parent[0]
        self._max_caption = int(np.asarray(first["caption_ids"]).shape[-1])
        self._num_image = int(np.asarray(first["image_indices"]).reshape(-1).shape[0])
        # A dropped caption is one <uncond> token, so even an empty-caption dataset fits it.
        self.max_doc_len = layout.longest_document(self._max_caption, self._num_image)
        if self.max_doc_len > seq_len:
            raise ValueError(
                f"one document ({self._max_caption} caption + {self._num_image} image + {SPECIAL_TOKENS} special "
                f"tokens = {self.max_doc_len}) is longer than seq_len={seq_len}")
        self.docs_per_row = seq_len // self.max_doc_len
        # Directions are stratified over groups of this many rows (draw_direction), and the
        # image heads' capacity is per group: target_capacity = (most image targets in a group
        # of group_rows rows, most text targets in one row; row_target_capacity's docstring).
        self.group_rows = int(group_rows)
        self.group_documents = self.group_rows * self.docs_per_row
        self.target_capacity = (
            group_image_targets(t2i_prob, self.group_documents, self._num_image),
            row_target_capacity(seq_len, self._max_caption, self._num_image)[1])
        # What the MoT buckets assume (model image_capacity, mot.make_bucket_routing).
        self.image_capacity = row_image_capacity(seq_len, self._max_caption, self._num_image)
        self.code_dim = lookup_codes(index_to_code, np.zeros(1, np.int32)).shape[1]
        self._seq_len, self._special, self._index_to_code = seq_len, special, index_to_code
        self._t2i_prob, self._caption_dropout, self._seed = t2i_prob, caption_dropout, seed
        self._t2i_caption_loss = bool(t2i_caption_loss)
        self.packing, self.bucket_rows, self._plan = packing, 1, None
        if packing == "first_fit":
            self._plan_first_fit(image_slots, lookahead, caption_lengths)

    def _plan_first_fit(self, image_slots: int, lookahead: int,
                        caption_lengths: np.ndarray | None) -> None:
        """Plans the rows (first_fit.plan_rows) and sets the bounds they obey."""
        seq_len, n_img = self._seq_len, self._num_image
        image_slots = int(image_slots) or first_fit.default_image_slots(seq_len, self._max_caption, n_img)
        first_fit.check_image_slots(seq_len, self._max_caption, n_img, image_slots)
        if caption_lengths is None:
            caption_lengths = [int(self._parent[i]["caption_len"]) for i in range(len(self._parent))]
        caption_lengths = np.asarray(caption_lengths, np.int64)
        if caption_lengths.shape != (len(self._parent),):
            raise ValueError(f"caption_lengths {caption_lengths.shape} must be [{len(self._parent)}]")
        t2i, dropped = draw_directions(self._seed, np.arange(len(self._parent)), self._t2i_prob,
                                       self._caption_dropout, self.group_documents)
        lengths = np.where(dropped, 1, caption_lengths) + n_img + SPECIAL_TOKENS
        cap = first_fit.t2i_per_group(self._t2i_prob, self.group_rows, image_slots, n_img)
        self._plan = first_fit.plan_rows(lengths, t2i, seq_len=seq_len, group_rows=self.group_rows,
                                         num_image_tokens=n_img, image_slots=image_slots,
                                         t2i_cap=cap, lookahead=int(lookahead))
        self.target_capacity = (cap * n_img, first_fit.row_text_targets(seq_len, self._max_caption, n_img))
        self.image_capacity, self.bucket_rows = image_slots, self.group_rows
        # What to watch when choosing data.packing and data.row_image_slots (the task logs it):
        # the share of slots that hold tokens here and under the fixed packer.
        fixed_rows = -(-len(lengths) // self.docs_per_row)
        self.fill = {"real_fraction": float(lengths.sum()) / (len(self) * seq_len),
                     "fixed_real_fraction": float(lengths.sum()) / (fixed_rows * seq_len),
                     "documents_per_row": len(lengths) / len(self)}

    def __len__(self) -> int:
        return super().__len__() if self._plan is None else len(self._plan[0]) - 1

    def row_examples(self, index: int) -> Sequence[int]:
        if self._plan is None:
            return super().row_examples(index)
        starts, examples = self._plan
        return examples[starts[index]:starts[index + 1]]

    def document(self, example_index: int) -> dict[str, np.ndarray]:
        """The document built from parent example `example_index`."""
        example = self._parent[example_index]
        caption = np.asarray(example["caption_ids"]).reshape(-1)
        length = int(example["caption_len"])
        indices = np.asarray(example["image_indices"]).reshape(-1)
        if not 0 <= length <= len(caption) or len(caption) != self._max_caption or len(indices) != self._num_image:
            raise ValueError(
                f"example {example_index}: caption_len={length}, caption_ids {caption.shape}, image_indices "
                f"{indices.shape}; expected caption_ids ({self._max_caption},), image_indices ({self._num_image},)")
        direction, drop = draw_direction(self._seed, example_index, self._t2i_prob,
                                         self._caption_dropout, self.group_documents)
        codes = lookup_codes(self._index_to_code, indices)
        return build_document(caption[:length], indices, codes, direction, self._special, drop_caption=drop,
                              t2i_caption_loss=self._t2i_caption_loss)

