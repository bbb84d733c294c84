"""Edit documents (data.name="shapes_edits") as the multimodal task's data.

The records of a shapes_edits split are chains of CHAIN_IMAGES images (mmjax.data.shapes_edits);
here each chain becomes one tokenized example (instructions as SentencePiece ids, images as the
tokenize stage's FSQ indices) and mmjax.data.edit_packing cuts documents of 1..CHAIN_EDITS edits
out of it. Training repeats every chain `objective.direction_redraws` times, each with its own
window draw (as the single-pair task redraws directions).
"""
from __future__ import annotations

import grain
import numpy as np

from mmjax import image_codebook
from mmjax.data import edit_packing, image_tokens, packing, pipeline
from mmjax.data.shapes_edits import CHAIN_IMAGES


def chain_examples(config, workdir, tokenizer, split: str) -> grain.MapDataset:
    """{caption_ids [CHAIN_IMAGES, T], caption_len [CHAIN_IMAGES], image_indices
    [CHAIN_IMAGES, n]} per chain of `split`. Row 0's text (the first image's caption) is not
    part of any edit document and is truncated freely; an instruction longer than
    data.max_caption_len is an error naming it."""
    from mmjax.tasks.multimodal import encode_caption  # the task module imports this one
    records = pipeline.image_caption_dataset(config.data, split, workdir.data_dir)
    tokens = image_tokens.load_tokens(workdir, split, len(records))
    max_len = int(config.data.max_caption_len)

    def make(c: int) -> dict:
        ids, lengths = [], []
        for k in range(CHAIN_IMAGES):
            rec = records[c * CHAIN_IMAGES + k]
            e, n = encode_caption(tokenizer, rec["caption"], max_len, "truncate" if k == 0 else "error")
            ids.append(e)
            lengths.append(n)
        return {"caption_ids": np.stack(ids), "caption_len": np.asarray(lengths, np.int32),
                "image_indices": np.stack([np.asarray(tokens[c * CHAIN_IMAGES + k], np.int32)
                                           for k in range(CHAIN_IMAGES)])}

    return grain.MapDataset.range(len(records) // CHAIN_IMAGES).map(make)


def packed_dataset(config, workdir, tokenizer, split: str, *, train: bool,
                   window: tuple[int, int] | None = None) -> grain.MapDataset:
    """Packed edit rows of `split`; `window=(start, edits)` fixes every document (evaluation)."""
    chains = chain_examples(config, workdir, tokenizer, split)
    redraws = int(config.objective.direction_redraws) if train else 1
    n = len(chains)
    parent = grain.MapDataset.range(n * redraws).map(lambda i: chains[i % n])
    obj = config.objective
    return edit_packing.EditPackedDataset(
        parent, seq_len=int(config.model.max_seq_len), special=packing.special_ids(tokenizer),
        # The lookup, not the table: an FSQ grid of 2^24+ codes (4x4-token images want wide codes)
        # does not fit in memory as [codebook_size, dim].
        index_to_code=image_codebook.load(config, workdir).indices_to_codes,
        chain_prob=float(obj.edit_chain_prob),
        dropout=float(obj.caption_dropout) if train else 0.0,
        seed=int(config.data.seed) + (0 if train else 1), window=window)
