"""Long captions under data.long_captions with a real SentencePiece model: truncation keeps the
longest word prefix that fits, drop removes exactly the long records, error names the record."""
import os

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
    dropped = captions.scan(tok, caps, MAX, "drop", "train")
    assert dropped.kept.tolist() == [0, 2]
    assert dropped.counts["dropped"] == 1 and dropped.counts["truncated"] == 0
    truncated = captions.scan(tok, caps, MAX, "truncate", "train")
    assert truncated.kept.tolist() == [0, 1, 2] and truncated.counts["truncated"] == 1
    with pytest.raises(ValueError, match="split 'train' record 1: .*data.long_captions='error'"):
        captions.scan(tok, caps, MAX, "error", "train")
    assert isinstance(truncated.kept, np.ndarray)
    # The scan keeps the ids it fitted, for each kept record, in order.
    assert [dropped.fitted[j].tolist() for j in range(len(dropped.fitted))] == [
        tok.encode(caps[0]), tok.encode(caps[2])]
    assert [truncated.fitted[j].tolist() for j in range(3)] == [
        captions.fit_caption(tok, c, MAX, "truncate")[0] for c in caps]


def test_training_examples_follow_the_policy(tmp_path):
    """tokenized_examples on the embedded shapes set with a tight max_caption_len: `drop` keeps
    exactly the records whose captions fit, each paired with *its own* image tokens;
    `truncate` keeps all, every caption within the limit."""
    import json

    from array_record.python.array_record_module import ArrayRecordWriter

    from bench.common import load_config
    from mmjax import stages
    from mmjax.data import pipeline
    from mmjax.stages.common import text_tokenizer
    from mmjax.tasks import multimodal as multimodal_task
    from mmjax.workdir import Workdir

    config = load_config("configs/mot_shapes.py:smoke")
    config.data.num_train, config.data.max_caption_len = 24, 9
    workdir = Workdir.from_config(config, tmp_path)
    stages.data.run(config, workdir)
    records = pipeline.image_caption_dataset(config.data, "train", workdir.data_dir)
    tok = text_tokenizer(workdir)
    lengths = [len(tok.encode(records[i]["caption"])) for i in range(len(records))]
    fits = [i for i, n in enumerate(lengths) if n <= 9]
    assert 0 < len(fits) < len(records)  # the limit really splits the set
    # image tokens whose row i is [i, i, ...]: shows which record an example came from
    os.makedirs(workdir.image_tokens)
    data_path, meta_path = workdir.image_token_files("train")
    writer = ArrayRecordWriter(str(data_path), "group_size:1")
    for i in range(len(records)):
        writer.write(np.full(4, i, np.int32).tobytes())
    writer.close()
    with open(meta_path, "w") as f:
        json.dump({"num_records": len(records), "grid": [2, 2]}, f)

    config.data.long_captions = "drop"
    dropped = multimodal_task.tokenized_examples(config, workdir, tok, "train")
    assert [int(dropped[j]["image_indices"][0]) for j in range(len(dropped))] == fits
    for j, i in enumerate(fits):
        n = int(dropped[j]["caption_len"])
        assert list(dropped[j]["caption_ids"][:n]) == list(tok.encode(records[i]["caption"]))
    config.data.long_captions = "truncate"
    kept = multimodal_task.tokenized_examples(config, workdir, tok, "train")
    assert len(kept) == len(records)
    assert all(0 < int(kept[j]["caption_len"]) <= 9 for j in range(len(kept)))
    for j in range(len(kept)):  # the ids the scan kept == encoding the record's caption now
        ids, n = multimodal_task.encode_caption(tok, records[j]["caption"], 9, "truncate")
        assert int(kept[j]["caption_len"]) == n
        np.testing.assert_array_equal(kept[j]["caption_ids"], ids)
    config.data.long_captions = "error"
    with pytest.raises(ValueError, match="data.long_captions='error'"):
        multimodal_task.tokenized_examples(config, workdir, tok, "train")
