"""Import your own images + captions as a TFDS ArrayRecord dataset that mmjax trains on.

  python -m mmjax.data.import_images --format=folder --source=photos/ --name=my_photos \
      --data_dir=/data/tfds
  python -m mmjax.main --config=configs/mot_shapes.py:demo --workdir=/tmp/run \
      --config.data.name=my_photos --config.data.data_dir=/data/tfds

Formats (mmjax.data.import_sources): `folder` (DIR/**/x.jpg|png|webp with x.txt beside it),
`jsonl` / `csv` (image path relative to the file, `--image_key` / `--caption_key`), `webdataset`
(tar shards by glob or braces; key.jpg + key.txt or key.json), `parquet` (a glob; image column of
bytes or {"bytes": ...}), `hf_disk` (a `datasets.Dataset.save_to_disk` directory).

What it writes: `<data_dir>/<name>/1.0.0/` with features {image: the encoded bytes as they came
(no re-encoding unless --resize), caption: str, key: str}, splits by a hash of each record's key
(so a re-import gives the same splits), and `import_report.json` (counts, the first bad records).
The grain pipeline decodes and resizes the images to `data.image_size`.

Why units and parts: the source is read in units (import_sources); unit k is done by process
k % process_count, which writes `<name>/_import_1.0.0/parts/<unit>.<split>.array_record` and then
a `<unit>.done.json` marker. A rerun skips done units (a kill -9 loses at most one unit's work,
never duplicates it). The final step (automatic for one process, `--finalize` after N processes)
links the parts into TFDS shards in unit order, writes the metadata in a scratch directory and
renames it into place, so nothing that looks complete exists before the end, and the dataset
is the same for any process count. An existing dataset is replaced only with `--overwrite`.

Bad records (unreadable image, missing caption file, tar member without its pair, a line that
is not JSON, a missing key or column, an empty or non-UTF-8 caption) are skipped and counted
(`--on_error=skip`, the first few logged with their file) or end the import with one line naming
the file and exit code 2 (`--on_error=error`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time

import numpy as np

from mmjax.data import import_sources
from mmjax.data.contract import MIN_IMAGE_SIZE, SPLITS
from mmjax.workdir import EMBEDDED_DATASETS

VERSION = "1.0.0"
ON_ERROR = ("skip", "error")
LONG_CAPTIONS = ("truncate", "drop", "error")
LOGGED_BAD = 10  # bad records logged per process (all are counted)


class ImportFailure(ValueError):
    """A bad record under --on_error=error, or a bad flag: one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Settings:
    format: str
    source: str
    name: str
    data_dir: str
    image_key: str = "image"
    caption_key: str = "caption"
    splits: tuple[tuple[str, float], ...] = (("train", 0.98), ("validation", 0.01), ("test", 0.01))
    on_error: str = "skip"
    long_captions: str = "truncate"
    max_caption_words: int = 0  # 0: no import-time limit (training applies data.long_captions)
    resize: int = 0
    unit_size: int = 1000
    process_index: int = 0
    process_count: int = 1
    overwrite: bool = False

    def identity(self) -> dict:
        """What must match for a rerun to resume an interrupted import."""
        d = dataclasses.asdict(self)
        for k in ("process_index", "overwrite", "on_error"):  # do not change what a unit holds
            d.pop(k)
        d["splits"] = [list(s) for s in self.splits]
        return d


# ---- pure pieces --------------------------------------------------------------------------------
def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
    """'train:0.98,validation:0.01,test:0.01' -> ((name, fraction), ...), fractions summing to 1.

    Every split the stages read (contract.SPLITS) needs a share > 0 and no other name is taken:
    a run trains on train, scores on validation and holds test out, so an import without one of
    them (or with a typo such as `valid`) would only fail when training starts."""
    out = []
    for part in text.split(","):
        name, _, frac = part.partition(":")
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name.strip()) or not 0 <= value <= 1:
            raise ImportFailure(f"--splits={text!r}: each entry must be name:fraction with a "
                                "fraction in [0, 1], e.g. train:0.98")
        out.append((name.strip(), value))
    if len({n for n, _ in out}) != len(out) or abs(sum(v for _, v in out) - 1.0) > 1e-6:
        raise ImportFailure(f"--splits={text!r}: names must be distinct and fractions sum to 1")
    shares = dict(out)
    if set(shares) != set(SPLITS) or not all(shares[n] > 0 for n in SPLITS):
        raise ImportFailure(f"--splits={text!r}: give each of {', '.join(SPLITS)} (and no other "
                            "name) a fraction > 0; runs train, validate and test on them")
    return tuple(out)


def split_of(key: str, splits) -> str:
    """The split of a record, from a hash of its key (stable across runs, machines and shardings)."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2.0**64
    total = 0.0
    for name, frac in splits:
        total += frac
        if u < total:
            return name
    return splits[-1][0]


def clean_caption(raw) -> str:
    """The caption as one line of text; ValueError (a bad record) when empty, not text, not UTF-8."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("caption is not UTF-8") from None
    if not isinstance(raw, str):
        raise ValueError(f"caption is {type(raw).__name__}, not text")
    text = " ".join(raw.split())
    if not text:
        raise ValueError("caption is empty")
    return text


def limit_caption(caption: str, max_words: int, policy: str) -> tuple[str | None, bool]:
    """(caption or None when dropped, whether it was too long) under the long-caption policy."""
    words = caption.split(" ")
    if max_words <= 0 or len(words) <= max_words:
        return caption, False
    if policy == "error":
        raise ImportFailure(f"caption has {len(words)} words > --max_caption_words={max_words} "
                            "(--long_captions=error)")
    return (" ".join(words[:max_words]) if policy == "truncate" else None), True


def record_ident(key: str, caption: str) -> int:
    """64-bit identity of a record: the same key with the same caption again is a duplicate."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape") + b"\0" + caption.encode("utf-8"))
    return int.from_bytes(digest.digest()[:8], "big")


def duplicate_positions(idents: list[np.ndarray]) -> list[np.ndarray]:
    """Per part, the positions of records seen earlier (in part order): all but the first copy.

    Holds 8 bytes per record (8 MB for 1M images), never the records themselves.
    """
    flat = np.concatenate(idents) if idents else np.zeros(0, np.uint64)
    _, first = np.unique(flat, return_index=True)
    dup = np.ones(flat.size, bool)
    dup[first] = False
    out, start = [], 0
    for part in idents:
        out.append(np.flatnonzero(dup[start:start + part.size]))
        start += part.size
    return out


def _without(path: str, positions: np.ndarray, target: str) -> int:
    """Writes `path`'s records minus `positions` to `target`; returns how many were kept."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    reader, writer, drop, kept = ArrayRecordReader(path), ArrayRecordWriter(target, "group_size:1"), set(positions.tolist()), 0
    try:
        for i in range(reader.num_records()):
            record = reader.read([i])[0]
            if i not in drop:
                writer.write(record)
                kept += 1
    finally:
        reader.close()
        writer.close()
    return kept


def check_image(data: bytes, resize: int) -> bytes:
    """The bytes to store: as they came (after a full decode proves them readable) or resized.

    ValueError for anything PIL cannot decode (truncated, corrupt, not an image).
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if not resize:
                im.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reads every byte
                im.load()
                return data
            im.load()
            array = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from None
    from mmjax.data.pipeline import _to_rgb_size
    out = io.BytesIO()
    small = Image.fromarray(_to_rgb_size(array, resize))
    if fmt == "JPEG":
        small.save(out, format="JPEG", quality=95)
    else:
        small.save(out, format="PNG")
    return out.getvalue()


def features():
    """The stored record: encoded image bytes, caption, source key (TF-free TFDS features)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "caption": tfds.features.Text(),
        "key": tfds.features.Text(),
    })


# ---- paths --------------------------------------------------------------------------------------
def final_dir(s: Settings) -> str:
    return os.path.join(s.data_dir, s.name, VERSION)


def staging_dir(s: Settings) -> str:
    return os.path.join(s.data_dir, s.name, f"_import_{VERSION}")


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ---- one process's share -------------------------------------------------------------------------
def _check_settings(s: Settings) -> None:
    if s.format not in import_sources.FORMATS:
        raise ImportFailure(f"--format={s.format!r} must be one of {import_sources.FORMATS}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", s.name):
        raise ImportFailure(f"--name={s.name!r} must be snake_case (a TFDS dataset name)")
    if s.name in EMBEDDED_DATASETS:
        raise ImportFailure(f"--name={s.name!r} is an embedded dataset's name (runs would build "
                            f"that one instead: {', '.join(EMBEDDED_DATASETS)}); pick another")
    if not s.data_dir:
        raise ImportFailure("--data_dir is required")
    if s.on_error not in ON_ERROR or s.long_captions not in LONG_CAPTIONS:
        raise ImportFailure(f"--on_error must be one of {ON_ERROR} and --long_captions one of {LONG_CAPTIONS}")
    if s.process_count < 1 or not 0 <= s.process_index < s.process_count:
        raise ImportFailure(f"--process_index={s.process_index} must be in [0, --process_count={s.process_count})")
    if s.unit_size < 1 or s.resize < 0 or s.max_caption_words < 0:
        raise ImportFailure("--unit_size must be >= 1 and --resize, --max_caption_words >= 0")
    if 0 < s.resize < MIN_IMAGE_SIZE:
        raise ImportFailure(f"--resize={s.resize}: 0 (keep the images as they came) or at least "
                            f"{MIN_IMAGE_SIZE} pixels, the smallest data.image_size")
    if os.path.exists(final_dir(s)) and not s.overwrite:
        raise ImportFailure(f"dataset {s.name} {VERSION} already exists in {final_dir(s)}; "
                            "pass --overwrite to replace it")


def _open_staging(s: Settings) -> str:
    """The staging dir, created or resumed; refuses one left by an import with other settings."""
    staging = staging_dir(s)
    parts = os.path.join(staging, "parts")
    path = os.path.join(staging, "settings.json")
    if os.path.exists(path):
        found = _read_json(path)
        if found != s.identity():
            raise ImportFailure(f"{staging} holds an interrupted import with other settings ({found}); "
                                "rerun it with the same flags, or delete that directory")
    os.makedirs(parts, exist_ok=True)
    if not os.path.exists(path):
        _write_json(path, s.identity())
    return parts


class _Counter:
    """Counts per unit and the first bad records (with file names)."""

    def __init__(self):
        self.splits: dict[str, int] = {}
        self.bad = 0
        self.truncated = 0
        self.dropped_long = 0
        self.duplicates = 0
        self.bad_examples: list[str] = []

    def as_dict(self) -> dict:
        return dict(splits=self.splits, bad=self.bad, truncated=self.truncated,
                    dropped_long=self.dropped_long, duplicates=self.duplicates,
                    bad_examples=self.bad_examples)


def _bad(s: Settings, counter: _Counter, origin: str, why: str, count: int, logged: list) -> None:
    if s.on_error == "error":
        raise ImportFailure(f"{origin}: {why} (--on_error=error)")
    counter.bad += count
    line = f"{origin}: {why}" + (f" ({count} records)" if count > 1 else "")
    if len(counter.bad_examples) < 5:
        counter.bad_examples.append(line)
    if logged[0] < LOGGED_BAD:
        logging.warning("skipped %s", line)
        logged[0] += 1


def import_unit(s: Settings, unit: import_sources.Unit, parts: str, logged: list) -> dict:
    """Writes one unit's records into per-split part files, then its done marker."""
    from array_record.python.array_record_module import ArrayRecordWriter

    feats = features()
    counter, idents, writers = _Counter(), {}, {}
    tmp = {split: os.path.join(parts, f"{unit.uid}.{split}.array_record.tmp") for split, _ in s.splits}
    try:
        for item in unit.read():
            if isinstance(item, import_sources.Bad):
                _bad(s, counter, item.origin, item.why, item.count, logged)
                continue
            try:
                caption = clean_caption(item.caption)
                image = check_image(item.image, s.resize)
            except ValueError as e:
                _bad(s, counter, item.origin, str(e), 1, logged)
                continue
            try:
                caption, long = limit_caption(caption, s.max_caption_words, s.long_captions)
            except ImportFailure as e:
                raise ImportFailure(f"{item.origin}: {e}") from None
            counter.truncated += int(long and caption is not None)
            if caption is None:
                counter.dropped_long += 1
                continue
            split = split_of(item.key, s.splits)
            if split not in writers:
                writers[split] = ArrayRecordWriter(tmp[split], "group_size:1")
            idents.setdefault(split, []).append(record_ident(item.key, caption))
            writers[split].write(feats.serialize_example(
                {"image": image, "caption": caption, "key": item.key}))
            counter.splits[split] = counter.splits.get(split, 0) + 1
    finally:
        for w in writers.values():
            w.close()
    for split in writers:
        np.save(os.path.join(parts, f"{unit.uid}.{split}.idents.npy"), np.asarray(idents[split], np.uint64))
        os.replace(tmp[split], os.path.join(parts, f"{unit.uid}.{split}.array_record"))
    done = counter.as_dict()
    _write_json(os.path.join(parts, f"{unit.uid}.done.json"), done)
    return done


def _spec(s: Settings) -> import_sources.SourceSpec:
    return import_sources.SourceSpec(s.format, s.source, s.image_key, s.caption_key, s.unit_size)


def run_share(s: Settings) -> dict:
    """This process's units (skipping those already done); writes its process marker."""
    _check_settings(s)
    # The first unit is read before the staging dir exists, so a --source that is not there
    # fails without leaving an interrupted import whose settings would block the corrected rerun.
    units = import_sources.units(_spec(s))
    first = next(units, None)
    parts = _open_staging(s)
    started, totals, logged, mine = time.time(), _Counter(), [0], []
    for k, unit in enumerate(itertools.chain([] if first is None else [first], units)):
        if k % s.process_count != s.process_index:
            continue
        mine.append(unit.uid)
        marker = os.path.join(parts, f"{unit.uid}.done.json")
        done = _read_json(marker) if os.path.exists(marker) else import_unit(s, unit, parts, logged)
        _add(totals, done)
    summary = totals.as_dict() | {"units": len(mine), "seconds": time.time() - started}
    _write_json(os.path.join(parts, f"process-{s.process_index:05d}-of-{s.process_count:05d}.json"),
                summary | {"unit_ids": mine})
    logging.info("import %s process %d/%d: %s records by split, %d bad skipped, %d truncated, "
                 "%d dropped as too long, %d duplicates, %.1f s", s.name, s.process_index,
                 s.process_count, summary["splits"], summary["bad"], summary["truncated"],
                 summary["dropped_long"], summary["duplicates"], summary["seconds"])
    return summary


def _add(totals: _Counter, done: dict) -> None:
    for split, n in done["splits"].items():
        totals.splits[split] = totals.splits.get(split, 0) + n
    for k in ("bad", "truncated", "dropped_long", "duplicates"):
        setattr(totals, k, getattr(totals, k) + done[k])
    totals.bad_examples += done["bad_examples"][: max(0, 10 - len(totals.bad_examples))]


# ---- the final step ----------------------------------------------------------------------------
def finalize(s: Settings) -> dict:
    """Links every unit's parts into TFDS shards (unit order), writes metadata, renames into place."""
    import tensorflow_datasets as tfds

    _check_settings(s)
    staging = staging_dir(s)
    parts = os.path.join(staging, "parts")
    if not os.path.exists(os.path.join(staging, "settings.json")):
        raise ImportFailure(f"nothing to finalize: no import in progress in {staging}")
    if _read_json(os.path.join(staging, "settings.json")) != s.identity():
        raise ImportFailure(f"{staging} holds an import with other settings; use the same flags")
    uids = []
    for p in range(s.process_count):
        marker = os.path.join(parts, f"process-{p:05d}-of-{s.process_count:05d}.json")
        if not os.path.exists(marker):
            raise ImportFailure(f"process {p} of {s.process_count} has not finished (no {marker}); "
                                f"run it with --process_index={p} --process_count={s.process_count}")
        uids += _read_json(marker)["unit_ids"]
    uids.sort()
    totals = _Counter()
    shards: dict[str, list[tuple[str, int]]] = {name: [] for name, _ in s.splits}
    for uid in uids:
        done = _read_json(os.path.join(parts, f"{uid}.done.json"))
        _add(totals, done)
        for split, n in done["splits"].items():
            shards[split].append((os.path.join(parts, f"{uid}.{split}.array_record"), n))
    if not sum(totals.splits.values()) and not totals.bad:
        found = (f"no {' / '.join(import_sources.IMAGE_EXTENSIONS)} file under it"
                 if s.format == "folder" else "no records in it")
        raise ImportFailure(f"--source={s.source!r} (--format={s.format}): {found}")
    if not sum(totals.splits.values()):
        raise ImportFailure(f"--source={s.source!r}: no usable record ({totals.bad} bad; first: "
                            f"{totals.bad_examples[:1]})")
    build = os.path.join(s.data_dir, s.name, f"_build_{VERSION}")
    shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build)
    split_infos = []
    for split, files in shards.items():
        if not files:  # e.g. a 1% split of a small source: training's eval would miss it
            logging.warning("split %r got no record (fraction %s of %d records); it is left out",
                            split, dict(s.splits)[split], sum(totals.splits.values()))
            continue
        dups = duplicate_positions([np.load(p[: -len(".array_record")] + ".idents.npy") for p, _ in files])
        lengths, size = [], 0
        for i, ((path, n), drop) in enumerate(zip(files, dups)):
            target = os.path.join(build, f"{s.name}-{split}.array_record-{i:05d}-of-{len(files):05d}")
            if drop.size:  # rare: rewrite only the parts that repeat an earlier record
                n = _without(path, drop, target)
                totals.duplicates += int(drop.size)
                totals.splits[split] -= int(drop.size)
            else:
                try:
                    os.link(path, target)  # no copy of the image bytes
                except OSError:
                    shutil.copyfile(path, target)
            lengths.append(n)
            size += os.path.getsize(target)
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=size))
    tfds.folder_dataset.write_metadata(
        data_dir=build, features=features(), split_infos=split_infos, version=VERSION,
        check_data=False, disable_shuffling=True,
        description=f"Imported by mmjax.data.import_images from {s.format} {s.source}")
    report = totals.as_dict() | {"settings": s.identity(), "records": sum(totals.splits.values())}
    _write_json(os.path.join(build, "import_report.json"), report)
    final = final_dir(s)
    if os.path.exists(final):  # only reachable with --overwrite (checked above)
        old = f"{final}.replaced{os.getpid()}"
        os.replace(final, old)
        os.replace(build, final)
        shutil.rmtree(old)
    else:
        os.replace(build, final)
    shutil.rmtree(staging)
    logging.info("imported %s: %d records %s into %s (%d bad skipped, %d captions truncated, %d "
                 "dropped as too long, %d duplicates)", s.name, report["records"], totals.splits,
                 final, totals.bad, totals.truncated, totals.dropped_long, totals.duplicates)
    return report


def import_dataset(s: Settings, *, finalize_only: bool = False) -> dict:
    """Runs this process's share; finalizes when it is the only process (or when asked)."""
    if finalize_only:
        return finalize(s)
    summary = run_share(s)
    if s.process_count == 1:
        return finalize(s)
    return summary


# ---- command line ------------------------------------------------------------------------------
def _define_flags():
    from absl import flags

    flags.DEFINE_enum("format", None, list(import_sources.FORMATS), "Source format.")
    flags.DEFINE_string("source", None, "Directory, file, glob or {brace} pattern of the source.")
    flags.DEFINE_string("name", None, "Dataset name (use it as --config.data.name).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir (use it as --config.data.data_dir).")
    flags.DEFINE_string("image_key", "image", "jsonl/csv key, Parquet/HF column of the image.")
    flags.DEFINE_string("caption_key", "caption", "Key/column of the caption (webdataset: in .json).")
    flags.DEFINE_string("splits", "train:0.98,validation:0.01,test:0.01", "name:fraction,...")
    flags.DEFINE_enum("on_error", "skip", list(ON_ERROR), "Bad records: skip (count, log) or error.")
    flags.DEFINE_enum("long_captions", "truncate", list(LONG_CAPTIONS),
                      "Captions over --max_caption_words: truncate at a word, drop, or error.")
    flags.DEFINE_integer("max_caption_words", 0, "Import-time caption limit in words (0: none; "
                         "training applies data.long_captions to data.max_caption_len tokens).")
    flags.DEFINE_integer("resize", 0, "Pre-resize to SxS at import (0: keep the bytes as they came).")
    flags.DEFINE_integer("unit_size", 1000, "Records per unit (the grain of resumption/sharding).")
    flags.DEFINE_integer("process_index", 0, "This process's index in a sharded import.")
    flags.DEFINE_integer("process_count", 1, "Processes of a sharded import (then run --finalize).")
    flags.DEFINE_bool("finalize", False, "Only the final step: link all processes' parts, write metadata.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name and version.")


def _settings_from_flags(FLAGS) -> Settings:
    for name in ("format", "source", "name", "data_dir"):
        if not getattr(FLAGS, name):
            raise ImportFailure(f"--{name} is required")
    return Settings(
        format=FLAGS.format, source=os.fspath(FLAGS.source), name=FLAGS.name,
        data_dir=os.path.abspath(FLAGS.data_dir), image_key=FLAGS.image_key,
        caption_key=FLAGS.caption_key, splits=parse_splits(FLAGS.splits), on_error=FLAGS.on_error,
        long_captions=FLAGS.long_captions, max_caption_words=FLAGS.max_caption_words,
        resize=FLAGS.resize, unit_size=FLAGS.unit_size, process_index=FLAGS.process_index,
        process_count=FLAGS.process_count, overwrite=FLAGS.overwrite)


def _main(argv):
    from absl import flags

    del argv
    logging.getLogger().setLevel(logging.INFO)
    try:
        settings = _settings_from_flags(flags.FLAGS)
        report = import_dataset(settings, finalize_only=flags.FLAGS.finalize)
    except (ValueError, OSError) as e:  # ImportFailure is a ValueError
        print(f"import_images: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}))


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(_main)
