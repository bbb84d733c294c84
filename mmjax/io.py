"""Atomic reads and writes of small artifacts (JSON, a SentencePiece model, any bytes) on any path.

Why one module: a reader must never see half a file (a killed job, a preempted host), and this
is the one place that knows how: write beside the target, then rename over it. Paths go through
`etils.epath`, so the same call works for local disks and for gs:// buckets. There an object
upload is already all-or-nothing (readers see the old object or the new one), so it is written in
place: a rename would be a server-side copy + delete, slower and refused over an existing object.

Files that only a local library can write or read (ArrayRecord via riegeli, which has no GCS
backend) go through `local_file_for_writing` (write locally, then upload atomically) and
`local_copy` / `copy_tree` (cached local copies under `cache_root()`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any

from etils import epath

from mmjax import cloud
from mmjax.errors import StorageError

CACHE_ENV = "MMJAX_CACHE_DIR"  # local copies of remote files (default: <tmp>/mmjax-cache)
_CHUNK = 16 << 20


def as_path(path) -> epath.Path:
    """An epath.Path for str / PathLike / epath inputs (gs://... stays a cloud path)."""
    return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def make_dirs(path) -> epath.Path:
    """Creates `path` (and parents); a path that cannot be a directory is one clear error."""
    path = as_path(path)
    if cloud.is_remote(path):  # object stores have no directories; gcsfs's mkdir would even
        return path            # create a missing bucket instead of reporting it
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create directory {path}: {e}") from e
    return path


def write_bytes_atomic(path, data: bytes) -> epath.Path:
    """Writes `data` to `path` so readers see the old file or the whole new one, never a part."""
    path = as_path(path)
    make_dirs(path.parent)
    try:
        if cloud.is_remote(path):  # one upload: atomic by itself (see module doc)
            path.write_bytes(data)
            return path
        tmp = _tmp_beside(path)
        tmp.write_bytes(data)
        tmp.replace(path)  # rename over an existing file (epath: copy + delete on buckets)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e}") from e
    return path


def write_text_atomic(path, text: str) -> epath.Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj: Any, indent: int = 2) -> epath.Path:
    """`obj` as indented JSON, atomically (numpy scalars and arrays become numbers and lists)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy / jax scalars and arrays
        return value.tolist()
    return str(value)


def read_json(path) -> Any:
    with as_path(path).open("r") as f:
        return json.load(f)


def _tmp_beside(path: epath.Path) -> epath.Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def copy_file_atomic(src, dst) -> epath.Path:
    """Streams `src` to `dst` (any two backends) so readers never see a partial `dst`."""
    src, dst = as_path(src), as_path(dst)
    make_dirs(dst.parent)
    tmp = dst if cloud.is_remote(dst) else _tmp_beside(dst)  # an upload is atomic by itself
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
        if tmp != dst:
            tmp.rename(dst)
    except OSError as e:
        raise StorageError(f"cannot copy {src} to {dst}: {e}") from e
    return dst


@contextlib.contextmanager
def local_file_for_writing(path):
    """Yields a local file name to write `path` with a local-only library (ArrayRecord); on a
    clean exit the file appears at `path` whole (renamed locally, uploaded for gs://)."""
    path = as_path(path)
    if not cloud.is_remote(path):
        make_dirs(path.parent)
        tmp = _tmp_beside(path)
        try:
            yield os.fspath(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    with tempfile.TemporaryDirectory(prefix="mmjax-upload-") as tmpdir:
        local = os.path.join(tmpdir, path.name)
        yield local
        copy_file_atomic(local, path)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "mmjax-cache")


def cache_dir_for(path, *key) -> str:
    """A local directory that belongs to the remote `path` (and `key`: anything that changes when
    the remote content does), under `cache_root()`."""
    digest = hashlib.sha256(json.dumps([os.fspath(path), *map(str, key)]).encode()).hexdigest()
    return os.path.join(cache_root(), digest[:20])


def local_copy(path, *key) -> str:
    """A local file name holding `path`'s bytes: `path` itself when local, else a cached copy
    (downloaded once per `key`; remote artifacts are never overwritten in place)."""
    path = as_path(path)
    if not cloud.is_remote(path):
        return os.fspath(path)
    local = os.path.join(cache_dir_for(path, *key), path.name)
    if not os.path.exists(local):
        copy_file_atomic(path, local)
    return local


def _walk_files(root: epath.Path, prefix: str = ""):
    """Relative names of every file under `root`, local or gs:// (not epath's walk(), which
    drops the gs:// scheme from the directories it yields)."""
    for child in sorted(root.iterdir()):
        if child.is_dir():
            yield from _walk_files(child, f"{prefix}{child.name}/")
        else:
            yield prefix + child.name


def copy_tree(src, dst, last: str = "") -> epath.Path:
    """Copies every file under `src` to `dst` (either may be remote), file `last` at the end: the
    readers' marker that the tree is complete (TFDS's dataset_info.json)."""
    src, dst = as_path(src), as_path(dst)
    names = sorted(_walk_files(src), key=lambda n: (n == last, n))
    for name in names:
        copy_file_atomic(src / name, dst / name)
    return dst
