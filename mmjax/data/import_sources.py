"""Readers of users' image-caption sources, streamed in *units* (the grain of resumption and sharding).

Why units: an import of millions of images must survive a kill and spread over many processes.
Each reader enumerates its source as an ordered sequence of small units (a chunk of files or
lines, one tar shard, one Parquet row group, a chunk of rows); unit k belongs to process
k % process_count, and a unit's output is written (and marked done) as a whole, so a rerun
redoes only unfinished units and the finished dataset is the same for any process count.
Enumerating units never reads images; reading a unit holds only that unit's current record.

A unit yields `Raw` records or `Bad` ones (why a record cannot be used, with its file name); the
importer decides whether a bad record is skipped or fatal.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import re
import tarfile
from typing import Callable, Iterator

FORMATS = ("folder", "jsonl", "csv", "webdataset", "parquet", "hf_disk")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass(frozen=True)
class Raw:
    """One source record: `key` decides the split; `origin` names the file (for messages)."""

    key: str
    image: bytes
    caption: object  # str or bytes (decoded and checked by the importer)
    origin: str


@dataclasses.dataclass(frozen=True)
class Bad:
    """A record (or `count` records) that cannot be used, and why."""

    origin: str
    why: str
    count: int = 1


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of the source read as a whole; `uid` sorts units in source order."""

    uid: str
    read: Callable[[], Iterator[Raw | Bad]]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    format: str
    source: str
    image_key: str = "image"
    caption_key: str = "caption"
    unit_size: int = 1000  # records per unit for folder / jsonl / csv / hf_disk


def content_key(image: bytes) -> str:
    """A key from the image bytes: the same picture lands in the same split wherever it sits."""
    return "sha1:" + hashlib.sha1(image).hexdigest()


def expand_pattern(pattern: str) -> list[str]:
    """Files of a glob with `{a,b}` / `{000..009}` braces (WebDataset style), in pattern order."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        body, out = match.group(1), []
        ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if ranged:
            lo, hi = ranged.groups()
            options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        for option in options:
            out += expand_pattern(pattern[: match.start()] + option + pattern[match.end():])
        return out
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern] if os.path.exists(pattern) else []


def _source_files(spec: SourceSpec) -> list[str]:
    files = [f for f in expand_pattern(spec.source) if os.path.isfile(f)]
    if not files:
        raise ValueError(f"--source={spec.source!r}: no {spec.format} file matches")
    return files


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---- folder: DIR/**/x.jpg with x.txt beside it ------------------------------------------------
def _walk_images(root: str) -> Iterator[str]:
    """Image paths under `root` in a deterministic order (sorted per directory), streamed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(dirpath, name)


def _folder_record(root: str, path: str) -> Raw | Bad:
    rel = os.path.relpath(path, root)
    caption_path = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(caption_path):
        return Bad(rel, f"no caption file {os.path.basename(caption_path)} beside the image")
    try:
        return Raw(os.path.splitext(rel)[0], _read_file(path), _read_file(caption_path), rel)
    except OSError as e:
        return Bad(rel, f"unreadable: {e.strerror or e}")


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _folder_units(spec: SourceSpec) -> Iterator[Unit]:
    root = spec.source
    if not os.path.isdir(root):
        raise ValueError(f"--source={root!r} is not a directory (format folder)")
    for k, paths in enumerate(_chunks(_walk_images(root), spec.unit_size)):
        yield Unit(f"{k:08d}", lambda paths=paths: (_folder_record(root, p) for p in paths))


# ---- jsonl / csv: one record per line, image paths relative to the file -----------------------
def _line_record(spec: SourceSpec, path: str, lineno: int, row) -> Raw | Bad:
    where = f"{os.path.basename(path)}:{lineno}"
    if not isinstance(row, dict):
        return Bad(where, f"expected an object with {spec.image_key!r} and {spec.caption_key!r}")
    for key in (spec.image_key, spec.caption_key):
        if key not in row or row[key] is None:
            return Bad(where, f"no key {key!r} (keys: {sorted(row)})")
    rel = str(row[spec.image_key])
    image_path = os.path.join(os.path.dirname(os.path.abspath(path)), rel)
    try:
        image = _read_file(image_path)
    except OSError as e:
        return Bad(where, f"image {rel}: {e.strerror or e}")
    return Raw(rel, image, row[spec.caption_key], f"{where} ({rel})")


def _jsonl_rows(path: str) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield lineno, Bad(f"{os.path.basename(path)}:{lineno}", f"not JSON ({e})")


def _csv_rows(path: str) -> Iterator[tuple[int, object]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            yield 0, row  # csv rows may span lines; numbered below by position


def _line_units(spec: SourceSpec) -> Iterator[Unit]:
    rows_of = _jsonl_rows if spec.format == "jsonl" else _csv_rows
    for fi, path in enumerate(_source_files(spec)):
        rows = rows_of(path)
        if spec.format == "csv":
            rows = ((n, row) for n, (_, row) in enumerate(rows, 2))  # line 1 is the header
        for k, chunk in enumerate(_chunks(rows, spec.unit_size)):
            def read(chunk=chunk, path=path):
                for lineno, row in chunk:
                    if isinstance(row, Bad):
                        yield row
                    else:
                        if spec.format == "csv":
                            row = {key: _unescape(v) for key, v in row.items() if key is not None}
                        yield _line_record(spec, path, lineno, row)
            yield Unit(f"{fi:05d}-{k:08d}", read)


def _unescape(value):
    """CSV cells read with surrogateescape back to bytes when they were not UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
    return value


# ---- webdataset: tar shards of key.jpg + key.txt | key.json ------------------------------------
_WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _wds_sample(spec: SourceSpec, shard: str, key: str, members: dict) -> Raw | Bad:
    where = f"{os.path.basename(shard)}:{key}"
    images = [ext for ext in members if "." + ext.lower() in IMAGE_EXTENSIONS]
    if not images:
        return Bad(where, f"no image member (has {sorted(members)})")
    if "txt" in members:
        caption = members["txt"]
    elif "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as e:
            return Bad(where, f"{key}.json is not JSON ({e})")
        if not isinstance(meta, dict) or spec.caption_key not in meta:
            return Bad(where, f"{key}.json has no key {spec.caption_key!r}")
        caption = meta[spec.caption_key]
    else:
        return Bad(where, f"no .txt or .json caption member (has {sorted(members)})")
    return Raw(key, members[sorted(images)[0]], caption, where)


def _wds_read(spec: SourceSpec, shard: str) -> Iterator[Raw | Bad]:
    """Streams a tar (never whole in memory), grouping consecutive members by key as WebDataset does."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                match = _WDS_NAME.match(info.name)
                if not match:
                    yield Bad(f"{os.path.basename(shard)}:{info.name}", "member name has no key.extension")
                    continue
                if match.group(1) != key:
                    if key is not None:
                        yield _wds_sample(spec, shard, key, members)
                    key, members = match.group(1), {}
                members[match.group(2)] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Bad(os.path.basename(shard), f"unreadable tar ({e})")
    if key is not None:
        yield _wds_sample(spec, shard, key, members)


def _wds_units(spec: SourceSpec) -> Iterator[Unit]:
    for k, shard in enumerate(_source_files(spec)):
        yield Unit(f"{k:08d}", lambda shard=shard: _wds_read(spec, shard))


# ---- parquet / hf_disk: an image column of bytes or {"bytes": ...} ---------------------------
def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


def _table_record(spec: SourceSpec, where: str, image, caption) -> Raw | Bad:
    data = _image_bytes(image)
    if data is None:
        return Bad(where, f"column {spec.image_key!r} holds no image bytes")
    if caption is None:
        return Bad(where, f"column {spec.caption_key!r} is empty")
    return Raw(content_key(bytes(data)), bytes(data), caption, where)


def _parquet_units(spec: SourceSpec) -> Iterator[Unit]:
    import pyarrow.parquet as pq  # the [import] extra

    for fi, path in enumerate(_source_files(spec)):
        meta = pq.ParquetFile(path).metadata
        columns = set(pq.read_schema(path).names)
        name = os.path.basename(path)
        first = 0  # file row of the row group's first row (for messages)
        for g in range(meta.num_row_groups):
            def read(path=path, g=g, name=name, rows=meta.row_group(g).num_rows, first=first):
                missing = [c for c in (spec.image_key, spec.caption_key) if c not in columns]
                if missing:
                    yield Bad(name, f"no column {missing[0]!r} (columns: {sorted(columns)})", rows)
                    return
                table = pq.ParquetFile(path).read_row_group(g, columns=[spec.image_key, spec.caption_key])
                row = first
                for batch in table.to_batches(max_chunksize=256):
                    images = batch.column(spec.image_key).to_pylist()
                    captions = batch.column(spec.caption_key).to_pylist()
                    for image, caption in zip(images, captions):
                        yield _table_record(spec, f"{name}:row {row}", image, caption)
                        row += 1
            yield Unit(f"{fi:05d}-{g:06d}", read)
            first += meta.row_group(g).num_rows


def _hf_units(spec: SourceSpec) -> Iterator[Unit]:
    import datasets  # the [import] extra

    try:
        loaded = datasets.load_from_disk(spec.source)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--source={spec.source!r} is not a saved Hugging Face dataset: {e}") from e
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for pi, (part, ds) in enumerate(parts):
        missing = [c for c in (spec.image_key, spec.caption_key) if c not in ds.column_names]
        if missing:
            raise ValueError(f"{spec.source}: no column {missing[0]!r} (columns: {ds.column_names})")
        if isinstance(ds.features[spec.image_key], datasets.Image):
            ds = ds.cast_column(spec.image_key, datasets.Image(decode=False))  # keep the bytes
        for k, start in enumerate(range(0, len(ds), spec.unit_size)):
            def read(ds=ds, start=start, part=part):
                rows = ds[start:start + spec.unit_size]  # memory-mapped Arrow, one chunk at a time
                for r, (image, caption) in enumerate(zip(rows[spec.image_key], rows[spec.caption_key])):
                    yield _table_record(spec, f"{part or 'dataset'}[{start + r}]", image, caption)
            yield Unit(f"{pi:03d}-{k:08d}", read)


_UNITS = {"folder": _folder_units, "jsonl": _line_units, "csv": _line_units,
          "webdataset": _wds_units, "parquet": _parquet_units, "hf_disk": _hf_units}


def units(spec: SourceSpec) -> Iterator[Unit]:
    """The source's units in order (streamed: a 1M-image source is never listed whole)."""
    if spec.format not in _UNITS:
        raise ValueError(f"--format={spec.format!r} must be one of {FORMATS}")
    return _UNITS[spec.format](spec)
