"""The sequence layout shared by the packer (data/packing.py) and the sampler (sampling.py).

Jax-free and numpy-free on purpose: both sides import it, so the sampler no longer imports the
data package, and the two can never disagree on an id or a template.

Document templates (position i predicts token i+1):
    text -> image:    <bos> caption <boi> img_1 .. img_n <eoi> <eos>
    caption dropped:  <bos> <uncond> <boi> img_1 .. img_n <eoi> <eos> (the CFG unconditional)
    image -> text:    <bos> <boi> img_1 .. img_n <eoi> caption <eos>  (the image is context)
`*_parts` give a template as (token run, modality) pairs for a caption and image-token sequence;
the packer concatenates them, the sampler builds its prompts from the same prefixes.

Why `<uncond>`: with an empty caption the dropped text->image document would be token-identical
to an image->text document up to `<eoi>` (`<bos> <boi> img ...`), so the model could not tell
"generate an image" from "read this context image". The dropped caption is therefore the single
token `<uncond>` (`uncond_caption`), in training rows and in the CFG sampler's unconditional half.

`image_pos` (the batch key of docs/INTERFACES.md): the index of an image token inside its image
(0 .. n-1, row = idx // side, col = idx % side), -1 at text and padding; `image_positions` gives
it for a template's runs.
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
    uncond: int  # the caption of a caption-dropped text->image document (CFG unconditional)


def special_ids(tokenizer) -> SpecialIds:
    """SpecialIds of anything with bos_id / eos_id / boi_id / eoi_id / uncond_id (TextTokenizer)."""
    return SpecialIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.boi_id, tokenizer.eoi_id,
                      tokenizer.uncond_id)


def uncond_caption(s: SpecialIds) -> list[int]:
    """The caption of a caption-dropped (unconditional) text->image document: `[<uncond>]`."""
    return [s.uncond]


def document_length(caption_len: int, num_image_tokens: int) -> int:
    """Tokens in one document (the same for both directions)."""
    return caption_len + num_image_tokens + SPECIAL_TOKENS


def longest_document(max_caption_len: int, num_image_tokens: int) -> int:
    """Tokens of the longest possible document: what the packers size rows by (a dropped
    caption is one <uncond> token, so even a dataset without captions needs one)."""
    return document_length(max(int(max_caption_len), 1), int(num_image_tokens))


def t2i_parts(caption: Sequence[int], image: Sequence[int], s: SpecialIds) -> list:
    """`<bos> caption <boi> img <eoi> <eos>` as (tokens, modality) runs (caption may be empty)."""
    return [([s.bos], TEXT), (caption, TEXT), ([s.boi], TEXT), (image, IMAGE),
            ([s.eoi, s.eos], TEXT)]


def i2t_parts(caption: Sequence[int], image: Sequence[int], s: SpecialIds) -> list:
    """`<bos> <boi> img <eoi> caption <eos>` as (tokens, modality) runs."""
    return [([s.bos, s.boi], TEXT), (image, IMAGE), ([s.eoi], TEXT), (caption, TEXT),
            ([s.eos], TEXT)]


def image_positions(parts: list) -> list[int]:
    """Per token of a template's runs: its index inside its image run, -1 outside images."""
    out: list[int] = []
    for tokens, modality in parts:
        n = len(tokens)
        out.extend(range(n) if modality == IMAGE else [-1] * n)
    return out


# ---- edit documents (data.name="shapes_edits"; mmjax.data.edit_packing, sampling.edit_image) ----
# image A, instruction, image B [, instruction, image C ...]:
#     <bos> <boi> A <eoi> instr_1 <boi> B <eoi> instr_2 <boi> C <eoi> ... <eos>
# A is a context image (image_block > 0); every image after an instruction is generated (causal,
# image loss); instruction tokens carry no text loss (see edit_packing for why).
def edit_parts(images: Sequence[Sequence[int]], instructions: Sequence[Sequence[int]],
               s: SpecialIds, *, close: bool = True) -> list:
    """(tokens, modality) runs of an edit document with len(images) == len(instructions) + 1;
    `close=False` stops after the last image's `<boi>` run when that image is empty (the
    sampler's prompt: pass the images given so far and the instruction to follow)."""
    if len(images) != len(instructions) + 1:
        raise ValueError(f"an edit document has one more image than instructions, got "
                         f"{len(images)} images and {len(instructions)} instructions")
    parts = [([s.bos, s.boi], TEXT), (images[0], IMAGE), ([s.eoi], TEXT)]
    for text, image in zip(instructions, images[1:]):
        parts += [(text, TEXT), ([s.boi], TEXT), (image, IMAGE), ([s.eoi], TEXT)]
    if close:
        parts.append(([s.eos], TEXT))
    else:
        parts = parts[:-2]  # the prompt ends at the last <boi>: drop its (empty) image and <eoi>
    return parts


def edit_document_length(instruction_lengths: Sequence[int], num_image_tokens: int) -> int:
    """Tokens in an edit document with these instruction lengths (one more image than them)."""
    return 2 + (len(instruction_lengths) + 1) * (num_image_tokens + 2) + sum(instruction_lengths)
