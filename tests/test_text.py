"""SentencePiece training is deterministic; the wrapper's specials, round trips and errors."""
import os

import numpy as np
import pytest
import sentencepiece as spm

from mmjax import config_defaults
from mmjax.data import pipeline, shapes, text
from mmjax.errors import MissingArtifactError
from mmjax.workdir import Workdir


@pytest.fixture(scope="module")
def captions():
    return [shapes.generate_record(0, "train", i)["caption"] for i in range(200)]


@pytest.fixture(scope="module")
def model_path(captions, tmp_path_factory):
    return text.train_text_tokenizer(captions, str(tmp_path_factory.mktemp("spm") / "m"), 256)


def test_training_is_deterministic(captions, model_path, tmp_path):
    again = text.train_text_tokenizer(captions, str(tmp_path / "again"), 256)
    assert open(again, "rb").read() == open(model_path, "rb").read()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write left nothing behind


def test_special_ids_and_soft_vocab_limit(model_path):
    tok = text.TextTokenizer(model_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.uncond_id) == (0, 2, 3, 4, 5, 6)
    assert 30 < tok.vocab_size < 256  # small closed vocabulary: the soft limit stopped early


def test_roundtrip_and_decode_rules(captions, model_path):
    tok = text.TextTokenizer(model_path)
    for caption in captions[:50]:
        ids = tok.encode(caption)
        assert tok.bos_id not in ids and tok.eos_id not in ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == caption
    assert len(tok.encode(captions[0])) < len(captions[0].split()) + 4  # word-level pieces
    ids = tok.encode("a small red circle")
    wrapped = [tok.bos_id, tok.uncond_id, tok.boi_id, *ids, tok.eoi_id, tok.pad_id, tok.eos_id,
               *tok.encode("at the top")]
    assert tok.decode(wrapped) == "a small red circle"
    assert tok.decode(np.array(ids + [tok.vocab_size + 7])) == "a small red circle"  # out-of-vocab skipped


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ValueError, match="nope.model"):
        text.TextTokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        text.TextTokenizer(str(bad))


def test_user_model_without_mmjax_specials_gets_appended_ids(captions, tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_prefix=str(tmp_path / "user"),
                                   vocab_size=40, model_type="bpe", minloglevel=2, num_threads=1)
    tok = text.TextTokenizer(str(tmp_path / "user.model"))
    size = spm.SentencePieceProcessor(model_file=str(tmp_path / "user.model")).get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # SentencePiece defaults
    assert {tok.pad_id, tok.boi_id, tok.eoi_id, tok.uncond_id} == {size, size + 1, size + 2, size + 3}
    assert tok.vocab_size == size + 4
    assert tok.decode([tok.boi_id, *tok.encode("a large red circle"), tok.eos_id]) == "a large red circle"


def test_build_and_load_text_tokenizer(tmp_path):
    cfg = config_defaults.data_config()
    cfg.update(num_train=48, num_validation=8, num_test=8, sp_vocab_size=128)
    wd = Workdir.from_config({"data": cfg}, tmp_path)
    with pytest.raises(MissingArtifactError, match="run --mode=data"):
        text.load_text_tokenizer(wd.sp_model)  # later stages never train one as a side effect
    pipeline.build_dataset(cfg, wd.data_dir)
    train_split = pipeline.image_caption_dataset(cfg, "train", wd.data_dir)
    path = text.build_text_tokenizer(cfg, wd.sp_model, train_split)
    assert path == str(tmp_path / "data" / "spm_shapes_128.model")
    stamp = os.stat(path).st_mtime_ns
    assert text.build_text_tokenizer(cfg, wd.sp_model, train_split) == path
    assert os.stat(path).st_mtime_ns == stamp  # never overwritten
    tok = text.load_text_tokenizer(path)
    caption = shapes.generate_record(0, "train", 3)["caption"]
    assert tok.decode(tok.encode(caption)) == caption
    cfg.sp_model_path = path
    assert Workdir.from_config({"data": cfg}, "elsewhere").sp_model == wd.sp_model
    cfg.sp_model_path = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="data.sp_model_path=.*missing.model"):
        text.load_text_tokenizer(Workdir.from_config({"data": cfg}, tmp_path).sp_model, users=True)


def test_strided_captions():
    data = [{"caption": str(i)} for i in range(10)]
    assert text.strided_captions(data, 4) == ["0", "3", "6", "9"]
    assert text.strided_captions(data, 100) == [str(i) for i in range(10)]
