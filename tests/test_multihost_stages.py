"""Single-process behaviour of the multi-host helpers: shares, sharded token files, agreements."""
import dataclasses

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mmjax import io, multihost
from mmjax.data import image_tokens
from mmjax.errors import InputError, MissingArtifactError
from mmjax.workdir import Workdir


@pytest.mark.parametrize("num,count", [(0, 3), (5, 1), (7, 3), (64, 2), (2, 5)])
def test_shard_ranges_are_contiguous_balanced_and_cover_everything(num, count):
    ranges = [multihost.shard_range(num, i, count) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_a_bad_index():
    with pytest.raises(ValueError, match="shard index 2"):
        multihost.shard_range(10, 2, 2)


def test_single_process_run_once_builds_and_errors_propagate():
    assert multihost.run_once("x", lambda: 7, lambda: pytest.fail("verify runs on peers only")) == 7
    with pytest.raises(KeyError):
        multihost.run_once("x", lambda: {}["missing"], lambda: None)
    with pytest.raises(KeyError):
        multihost.together("x", lambda: {}["missing"])
    assert multihost.all_ok(False) == [False]


def _write(path, rows):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for row in rows:
        writer.write(np.asarray(row, np.int32).tobytes())
    writer.close()


META = {"dataset": "shapes", "image_size": 32, "levels": [8, 5], "grid": [1, 2],
        "num_records": 5, "tokenizer_step": 3}


def _workdir(tmp_path):
    wd = Workdir(root=io.as_path(tmp_path))
    io.make_dirs(wd.image_tokens)
    return wd


def test_shards_read_in_sidecar_order_equal_one_file(tmp_path):
    rows = np.arange(10, dtype=np.int32).reshape(5, 2)
    wd = _workdir(tmp_path)
    shards = [wd.image_token_shard("train", i, 2) for i in range(2)]
    assert [s.name for s in shards] == ["train-00000-of-00002.array_record",
                                        "train-00001-of-00002.array_record"]
    assert wd.image_token_shard("train", 0, 1) == wd.image_token_files("train")[0]
    # Listed out of name order on purpose: the sidecar's order is the record order.
    _write(shards[0], rows[3:])
    _write(shards[1], rows[:3])
    io.write_json_atomic(wd.image_token_files("train")[1],
                         {**META, "files": [shards[1].name, shards[0].name]})
    ds = image_tokens.load_tokens(wd, "train", 5)
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(5)]), rows)


def test_an_empty_shard_and_an_old_sidecar_without_files(tmp_path):
    rows = np.arange(10, dtype=np.int32).reshape(5, 2)
    wd = _workdir(tmp_path)
    _write(wd.image_token_files("train")[0], rows)
    io.write_json_atomic(wd.image_token_files("train")[1], META)  # no `files`: the single file
    ds = image_tokens.load_tokens(wd, "train", 5)
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(5)]), rows)

    other = dataclasses.replace(wd, tokens_dir_override=str(tmp_path / "sharded"))
    io.make_dirs(other.image_tokens)
    shards = [other.image_token_shard("train", i, 3) for i in range(3)]
    _write(shards[0], rows)
    _write(shards[1], [])  # more processes than records leave a share empty
    _write(shards[2], [])
    io.write_json_atomic(other.image_token_files("train")[1],
                         {**META, "files": [s.name for s in shards]})
    ds = image_tokens.load_tokens(other, "train", 5)
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(5)]), rows)


def test_a_missing_shard_names_the_tokenize_stage_and_a_short_one_is_an_error(tmp_path):
    wd = _workdir(tmp_path)
    shards = [wd.image_token_shard("train", i, 2) for i in range(2)]
    _write(shards[0], np.zeros((2, 2)))
    io.write_json_atomic(wd.image_token_files("train")[1],
                         {**META, "files": [s.name for s in shards]})
    with pytest.raises(MissingArtifactError, match="--mode=tokenize"):
        image_tokens.load_tokens(wd, "train", 5)
    _write(shards[1], np.zeros((2, 2)))  # 4 records, the sidecar says 5
    with pytest.raises(InputError, match="hold 4 records"):
        image_tokens.load_tokens(wd, "train", 5)


def test_existing_tokens_are_reused_only_when_their_content_fields_match(tmp_path):
    from mmjax.stages import tokenize
    wd = _workdir(tmp_path)
    assert not tokenize._existing(wd, "train", META)  # nothing there: tokenize
    # Written by 2 processes, read by 1: the same tokens, only stored in two files.
    io.write_json_atomic(wd.image_token_files("train")[1], {**META, "files": ["a", "b"]})
    assert tokenize._existing(wd, "train", META)
    with pytest.raises(InputError, match="Refusing to overwrite"):
        tokenize._existing(wd, "train", {**META, "tokenizer_step": 4})
