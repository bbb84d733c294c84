"""Long captions under data.long_captions with a real SentencePiece model: truncation keeps the
longest word prefix that fits, drop removes exactly the long records, error names the record."""
import numpy as np
import pytest

from mmjax.data import captions, shapes, text

MAX = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [shapes.generate_record(0, "train", i, 32, 3)["caption"] for i in range(300)]
    path = text.train_text_tokenizer(corpus, str(tmp_path_factory.mktemp("spm") / "m"), 128)
    return text.TextTokenizer(path)


def test_truncation_is_the_longest_word_prefix_that_fits(tok):
    caption = "a large red circle in the top left and a small blue square in the bottom right"
    assert len(tok.encode(caption)) > MAX
    ids, long = captions.fit_caption(tok, caption, MAX, "truncate")
    assert long and len(ids) <= MAX
    words = caption.split()
    k = next(k for k in range(len(words), 0, -1) if tok.encode(" ".join(words[:k])) == ids)
    assert len(tok.encode(" ".join(words[:k + 1]))) > MAX  # one more word would not fit
    assert captions.fit_caption(tok, "a red circle", MAX, "truncate") == (tok.encode("a red circle"), False)


def test_drop_and_error(tok):
    caps = ["a red circle", "a large red circle in the top left and a small blue square below it",
            "a blue square"]
    kept, counts = captions.scan(tok, caps, MAX, "drop", "train")
    assert kept.tolist() == [0, 2] and counts["dropped"] == 1 and counts["truncated"] == 0
    kept, counts = captions.scan(tok, caps, MAX, "truncate", "train")
    assert kept.tolist() == [0, 1, 2] and counts["truncated"] == 1
    with pytest.raises(ValueError, match="split 'train' record 1: .*data.long_captions='error'"):
        captions.scan(tok, caps, MAX, "error", "train")
    assert isinstance(kept, np.ndarray)
