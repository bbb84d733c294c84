"""SentencePiece text tokenizer: deterministic training and a small wrapper with mmjax's specials.

Why these choices:
- Training is made reproducible (one thread, no sentence sampling or shuffling, fixed options), so
  the same captions give a byte-identical `.model` and a rerun never changes token ids under a
  checkpoint.
- BPE with `hard_vocab_limit=False`: the embedded captions have a closed vocabulary of a few dozen
  words, far below the default 256. A soft limit lets training stop when nothing is left to merge
  (the vocabulary then is *smaller* than requested; read `TextTokenizer.vocab_size`), and BPE ends
  with whole-word pieces (~26 tokens for a 3-object shapes caption) where unigram with a soft limit
  collapses to characters.
- Fixed special ids pad=0, unk=1, bos=2, eos=3, then user symbols `<boi>`, `<eoi>`, `<uncond>`
  (4, 5, 6; `<uncond>` is the caption of a CFG-unconditional document, see mmjax/layout.py). A user
  model lacking some of them still works: missing specials get ids appended after its vocabulary.
  (A model trained before `<uncond>` existed therefore gains one id: its old checkpoints, sized to
  the old vocabulary, need retraining.)
"""
from __future__ import annotations

import io
import logging
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm

from mmjax import io as mmjax_io
from mmjax.errors import InputError, MissingArtifactError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BOI, EOI, UNCOND = "<boi>", "<eoi>", "<uncond>"


def train_text_tokenizer(
    captions: Iterable[str],
    model_prefix_path: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> str:
    """Train SentencePiece on `captions`; write `<model_prefix_path>.model` atomically; return its path.

    Deterministic: the same captions and arguments give byte-identical model files. The resulting
    vocabulary may be smaller than `vocab_size` when the corpus is small (soft limit, see module doc).
    """
    if vocab_size < 8:
        raise InputError(f"vocab_size={vocab_size} is too small (7 ids are reserved for specials)")
    sentences = [c for c in (str(c).strip() for c in captions) if c]
    if not sentences:
        raise InputError(f"no non-empty captions to train the tokenizer {model_prefix_path!r} on")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=[BOI, EOI, UNCOND],
        hard_vocab_limit=False,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = os.fspath(model_prefix_path) + ".model"
    mmjax_io.write_bytes_atomic(path, writer.getvalue())
    return path


class TextTokenizer:
    """Encode captions to ids (no specials added) and decode generated ids back to text."""

    def __init__(self, path):
        """Loads the model at `path` (local or gs://: the bytes are read through epath)."""
        self.path = os.fspath(path)
        file = mmjax_io.as_path(path)
        if not file.is_file():
            raise InputError(f"SentencePiece model file not found: {self.path!r}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(file.read_bytes())
        except (RuntimeError, OSError) as err:
            raise InputError(f"corrupt SentencePiece model file {self.path!r}: {err}") from err
        size = self._sp.get_piece_size()
        if size == 0:
            raise InputError(f"corrupt SentencePiece model file {self.path!r}: empty vocabulary")
        extra: list[str] = []

        def special(found: int, name: str) -> int:
            """The model's id for a special, or a new id after its vocabulary when it has none."""
            if found >= 0:
                return found
            extra.append(name)
            return size + len(extra) - 1

        self._pad = special(self._sp.pad_id(), "pad")
        self._bos = special(self._sp.bos_id(), "bos")
        self._eos = special(self._sp.eos_id(), "eos")
        self._boi = special(self._piece_id(BOI), BOI)
        self._eoi = special(self._piece_id(EOI), EOI)
        self._uncond = special(self._piece_id(UNCOND), UNCOND)
        self._sp_size = size
        self._vocab_size = size + len(extra)
        self._skip = {self._pad, self._bos, self._boi, self._eoi, self._uncond}

    def _piece_id(self, piece: str) -> int:
        """Id of `piece`, or -1 when the model does not hold it (SentencePiece answers unk)."""
        found = self._sp.piece_to_id(piece)
        return found if self._sp.id_to_piece(found) == piece else -1

    @property
    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size): the model's pieces plus any appended specials."""
        return self._vocab_size

    pad_id = property(lambda self: self._pad)
    bos_id = property(lambda self: self._bos)
    eos_id = property(lambda self: self._eos)
    boi_id = property(lambda self: self._boi)
    eoi_id = property(lambda self: self._eoi)
    uncond_id = property(lambda self: self._uncond)

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without bos/eos."""
        return list(self._sp.encode(str(text)))

    def unknown_pieces(self, text: str) -> list[str]:
        """The pieces of `text` the model maps to its unknown id (characters never seen in the
        captions it was trained on): a prompt holding them would be generated from a guess."""
        unk = self._sp.unk_id()
        return [piece for i, piece in zip(self._sp.encode(str(text)),
                                          self._sp.encode(str(text), out_type=str)) if i == unk]

    def decode(self, ids) -> str:
        """Text of `ids` up to the first eos; pad/bos/<boi>/<eoi>/<uncond> and out-of-vocabulary ids are skipped."""
        kept = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self._eos:
                break
            if i in self._skip or not 0 <= i < self._sp_size:
                continue
            kept.append(i)
        return self._sp.decode(kept)


def strided_captions(dataset, max_sentences: int) -> list[str]:
    """Captions of at most `max_sentences` records evenly strided over `dataset` (deterministic)."""
    n = len(dataset)
    if n == 0:
        raise InputError("the train split is empty: no captions to train a tokenizer on")
    stride = max(1, -(-n // max(1, int(max_sentences))))
    return [dataset[i]["caption"] for i in range(0, n, stride)]


def build_text_tokenizer(data_cfg, path, train_split) -> str:
    """The data stage's half: trains SentencePiece on the train captions into `path` once (an
    existing model is never overwritten) and returns the path. `train_split`: the records."""
    if mmjax_io.as_path(path).is_file():
        return os.fspath(path)
    captions = strided_captions(train_split, data_cfg.sp_max_sentences)
    logging.info("training SentencePiece (vocab %d) on %d captions -> %s", data_cfg.sp_vocab_size,
                 len(captions), path)
    return train_text_tokenizer(captions, os.fspath(path)[: -len(".model")],
                                int(data_cfg.sp_vocab_size))


def load_text_tokenizer(path, *, users: bool = False) -> TextTokenizer:
    """The tokenizer at `path`; a missing file names the config field (a user's model) or the
    data stage (a trained one) instead of training one as a side effect."""
    if not mmjax_io.as_path(path).is_file():
        if users:
            raise InputError(f"data.sp_model_path={os.fspath(path)!r} does not exist")
        raise MissingArtifactError(f"no SentencePiece model at {os.fspath(path)}; run --mode=data "
                                   "(or --mode=pipeline) first")
    return TextTokenizer(path)
