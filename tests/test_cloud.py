"""gs:// paths against a real GCS API server on 127.0.0.1 (tests/gcs_server.py): what
STORAGE_EMULATOR_HOST implies for each client, atomic small files, ArrayRecord files through a
local temp file and a local read cache, metrics on a store that cannot append, and the one-line
errors for a missing bucket and missing credentials."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from gcs_server import fake_gcs, list_objects, read_object
from mmjax import cloud, io
from mmjax.errors import StorageError
from child_env import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "test-bucket"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with fake_gcs(str(tmp_path_factory.mktemp("gcs"))) as url:
        yield url


@pytest.fixture
def emulator(server, monkeypatch, tmp_path):
    """This process talks to the server (every derived variable restored afterwards)."""
    import fsspec
    for key, value in cloud.derived_environment(server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(io.CACHE_ENV, str(tmp_path / "cache"))
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(fsspec.config.conf, protocol, {})
    cloud.configure()
    return server


def test_configure_derives_every_client_setting(monkeypatch):
    for key in cloud.derived_environment("x"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")  # scheme-less, as gcloud's
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://elsewhere:1")  # the user's wins
    import fsspec
    monkeypatch.setitem(fsspec.config.conf, "gs", {})
    derived = cloud.configure()
    assert derived["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
    assert os.environ["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:4443"
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://elsewhere:1"
    assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] and fsspec.config.conf["gs"]["token"] == "anon"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert cloud.configure() == {}


def test_is_remote():
    assert cloud.is_remote("gs://b/x") and cloud.is_remote("s3://b")
    assert not cloud.is_remote("/tmp/gs:/x") and not cloud.is_remote("relative/dir")
    assert cloud.bucket_of("gs://my-bucket/run/x") == "my-bucket"


def test_small_files_are_written_in_place_and_overwritten(emulator, tmp_path):
    path = f"gs://{BUCKET}/small/results.json"
    io.write_json_atomic(path, {"a": np.float32(1.5)})
    io.write_json_atomic(path, {"a": 2})  # an existing object is replaced (no rename refused)
    assert io.read_json(path) == {"a": 2}
    assert json.loads(read_object(emulator, BUCKET, "small/results.json")) == {"a": 2}
    assert list_objects(emulator, BUCKET, "small/") == ["small/results.json"]  # no temp objects


def test_array_record_goes_through_a_local_file_both_ways(emulator, tmp_path):
    rows = [np.arange(i, i + 4, dtype=np.int32) for i in range(5)]
    target = io.as_path(f"gs://{BUCKET}/tokens/train.array_record")
    with io.local_file_for_writing(target) as local:
        assert not cloud.is_remote(local)
        writer = ArrayRecordWriter(local, "group_size:1")
        for row in rows:
            writer.write(row.tobytes())
        writer.close()
    assert not os.path.exists(local)  # the local temp file is gone after the upload
    assert "tokens/train.array_record" in list_objects(emulator, BUCKET, "tokens/")
    cached = io.local_copy(target, "v1")
    assert cached.startswith(str(tmp_path / "cache"))
    import grain
    source = grain.sources.ArrayRecordDataSource(cached)
    assert [np.frombuffer(source[i], np.int32).tolist() for i in range(5)] == \
        [r.tolist() for r in rows]
    assert io.local_copy(target, "v1") == cached and io.local_copy(target, "v2") != cached


def test_copy_tree_puts_the_marker_last(emulator, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for name in ("dataset_info.json", "a.bin", "sub/b.bin"):
        (src / name).write_bytes(name.encode())
    io.copy_tree(src, f"gs://{BUCKET}/tree", last="dataset_info.json")
    back = tmp_path / "back"
    io.copy_tree(f"gs://{BUCKET}/tree", back)
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == \
        ["a.bin", "dataset_info.json", "sub/b.bin"]
    assert (back / "sub/b.bin").read_bytes() == b"sub/b.bin"


def test_metrics_writer_keeps_rows_on_a_store_without_append(emulator):
    from mmjax.metrics_writer import MetricsWriter, read_jsonl
    run = f"gs://{BUCKET}/metrics_run"
    first = MetricsWriter(run)
    first.write(1, {"loss": 2.0})
    first.write(2, {"loss": 1.5})
    first.close()
    second = MetricsWriter(run)  # a resumed attempt continues the file
    second.write(3, {"loss": 1.0})
    second.close()
    assert [r["step"] for r in read_jsonl(f"{run}/train_metrics.jsonl")] == [1, 2, 3]
    events = [n for n in list_objects(emulator, BUCKET, "metrics_run/tensorboard/train/")]
    assert events and all("tfevents" in n for n in events)


def test_missing_bucket_is_one_error_naming_it(emulator):
    with pytest.raises(StorageError, match="bucket gs://no-such-bucket does not exist"):
        cloud.check_path("gs://no-such-bucket/run", write=True)
    assert "no-such-bucket" not in json.dumps(list_objects(emulator, BUCKET))
    cloud.check_path(f"gs://{BUCKET}/run", write=True)  # writable: no error, no probe left
    assert not [n for n in list_objects(emulator, BUCKET, "run/") if "probe" in n]


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "mmjax.main",
                           f"--config={REPO}/configs/mot_shapes.py:smoke", "--mode=data", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _clean_env(**extra):
    env = child_env(drop_prefixes=("STORAGE_EMULATOR", "TENSORSTORE_GCS", "GOOGLE_", "GCSFS_"))
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def test_cli_without_credentials_names_the_path(tmp_path):
    # No emulator, no ADC file (empty HOME / gcloud config), no metadata server (a closed port).
    env = _clean_env(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
                     GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    proc = _cli(["--workdir=gs://some-bucket/run"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mmjax: error: gs://some-bucket/run: no Google Cloud credentials")
    assert "STORAGE_EMULATOR_HOST" in last
    assert not (tmp_path / "gs:").exists()


def test_cli_missing_bucket_names_it_and_creates_nothing(server, tmp_path):
    env = _clean_env(STORAGE_EMULATOR_HOST=server)  # the only setting the user gives
    proc = _cli(["--workdir=gs://no-such-bucket/run"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "mmjax: error: gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist")
    proc = _cli([f"--workdir=gs://{BUCKET}/ok", "--config.data.data_dir=gs://other-missing/d"],
                env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bucket gs://other-missing does not exist" in proc.stderr.strip().splitlines()[-1]
    with __import__("urllib.request").request.urlopen(f"{server}/storage/v1/b") as r:
        buckets = [b["name"] for b in json.load(r)["items"]]
    assert "no-such-bucket" not in buckets and "other-missing" not in buckets
    assert not (tmp_path / "gs:").exists()
