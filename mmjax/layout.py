"""The sequence layout shared by the packer (data/packing.py) and the sampler (sampling.py).

Jax-free and numpy-free on purpose: both sides import it, so the sampler no longer imports the
data package, and the two can never disagree on an id or a template.

Document templates (position i predicts token i+1):
    text -> image:    <bos> caption <boi> img_1 .. img_n <eoi> <eos>
    caption dropped:  <bos> <boi> img_1 .. img_n <eoi> <eos>          (the CFG unconditional)
    image -> text:    <bos> <boi> img_1 .. img_n <eoi> caption <eos>  (the image is context)
`*_parts` give a template as (token run, modality) pairs for a caption and image-token sequence;
the packer concatenates them, the sampler builds its prompts from the same prefixes.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

TEXT, IMAGE = 0, 1  # modality ids
SPECIAL_TOKENS = 4  # <bos>, <boi>, <eoi>, <eos> in every document
T2I_PROMPT_SPECIALS = 2  # <bos> and <boi> around the caption of a text->image prompt
I2T_PROMPT_SPECIALS = 3  # <bos> <boi> ... <eoi> around the image of an image->text prompt
PAD_ID = 0  # Written after <eos> in sampled text and in padding (the SentencePiece pad id).


class SpecialIds(NamedTuple):
    """Text ids the layouts need (a TextTokenizer provides them via `special_ids`)."""

    bos: int
    eos: int
    boi: int
    eoi: int


def special_ids(tokenizer) -> SpecialIds:
    """SpecialIds of anything with bos_id / eos_id / boi_id / eoi_id (e.g. TextTokenizer)."""
    return SpecialIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.boi_id, tokenizer.eoi_id)


def document_length(caption_len: int, num_image_tokens: int) -> int:
    """Tokens in one document (the same for both directions)."""
    return caption_len + num_image_tokens + SPECIAL_TOKENS


def t2i_parts(caption: Sequence[int], image: Sequence[int], s: SpecialIds) -> list:
    """`<bos> caption <boi> img <eoi> <eos>` as (tokens, modality) runs (caption may be empty)."""
    return [([s.bos], TEXT), (caption, TEXT), ([s.boi], TEXT), (image, IMAGE),
            ([s.eoi, s.eos], TEXT)]


def i2t_parts(caption: Sequence[int], image: Sequence[int], s: SpecialIds) -> list:
    """`<bos> <boi> img <eoi> caption <eos>` as (tokens, modality) runs."""
    return [([s.bos, s.boi], TEXT), (image, IMAGE), ([s.eoi], TEXT), (caption, TEXT),
            ([s.eos], TEXT)]
