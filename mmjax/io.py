"""Atomic reads and writes of small artifacts (JSON, a SentencePiece model, any bytes) on any path.

Why one module: a reader must never see half a file (a killed job, a preempted host), and this
is the one place that knows how: write beside the target, then rename over it. Paths go through
`etils.epath`, so the same call works for local disks and for gs:// buckets (where a rename is a
copy + delete of one object, still never visible half-written).
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

from etils import epath

from mmjax.errors import StorageError


def as_path(path) -> epath.Path:
    """An epath.Path for str / PathLike / epath inputs (gs://... stays a cloud path)."""
    return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def make_dirs(path) -> epath.Path:
    """Creates `path` (and parents); a path that cannot be a directory is one clear error."""
    path = as_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create directory {path}: {e}") from e
    return path


def write_bytes_atomic(path, data: bytes) -> epath.Path:
    """Writes `data` to `path` so readers see the old file or the whole new one, never a part."""
    path = as_path(path)
    make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
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
