"""Image-caption records and resumable batches (grain).

Why grain: records are served by random access (`MapDataset` over an ArrayRecord data source), so
shuffling, per-process sharding and *resuming* are pure index arithmetic: the iterator state is a
couple of integers that the trainer stores next to the model checkpoint
(`grain.checkpoint.CheckpointSave/CheckpointRestore`), and a restored run sees exactly the batches
the interrupted one would have seen.

Records follow docs/INTERFACES.md: image uint8 [S, S, 3], caption str, attributes int32
[max_objects, 5] (-1 padding), label int32, index int64 (position in the split). For standard TFDS
sets with a ClassLabel, `label` is the class id (-1 when there is none).

Only the data stage writes a dataset (`build_dataset`, on one process); every later stage reads it.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import builders, remote
from mmjax.data.contract import SPLITS
from mmjax.errors import InputError, MissingArtifactError


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """How to turn one raw source record into a contract record (picklable for grain workers)."""

    dataset: str
    image_size: int
    max_objects: int
    image_key: str = "image"
    caption_key: str = "caption"  # "" -> caption from the label names
    label_key: str = "label"
    label_names: tuple[str, ...] | None = None  # ClassLabel names when captions come from labels


def _check_split(split: str, builder, dataset: str) -> None:
    """ValueError for a split the prepared dataset does not have (slices like train[:10%] allowed)."""
    available = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in available:
        raise InputError(f"unknown split {split!r} for dataset {dataset!r}; available: {available}")


def _standard_builder(data_cfg, data_dir: str | None):
    """A prepared standard TFDS builder; never downloads (ValueError naming name and dir)."""
    where = data_dir or f"{tfds.core.constants.DATA_DIR} (TFDS default)"
    try:
        builder = tfds.builder(data_cfg.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise InputError(
            f"TFDS dataset {data_cfg.name!r} is not known to tensorflow_datasets (data_dir {where})"
        ) from err
    if not builder.is_prepared():
        raise InputError(
            f"TFDS dataset {data_cfg.name!r} is not prepared in data_dir {where}; prepare it there first "
            f"(e.g. `tfds build {data_cfg.name} --data_dir=... --file_format=array_record`); mmjax never downloads"
        )
    return builder


def build_dataset(data_cfg, data_dir) -> dict[str, int]:
    """The data stage's half: generates an embedded set into `data_dir` once (a no-op when it is
    already there) or checks that a standard TFDS set is prepared; returns the split sizes."""
    if data_cfg.name in builders.EMBEDDED and remote.is_remote(data_dir):
        builder = remote.publish(functools.partial(builders.embedded_builder, data_cfg), data_dir,
                                 lambda local: local.download_and_prepare())
    elif data_cfg.name in builders.EMBEDDED:
        builder = builders.prepare_embedded(data_cfg, os.fspath(data_dir))
    else:
        builder = _standard_builder(data_cfg, None if data_dir is None else os.fspath(data_dir))
    return {split: len(image_caption_dataset(data_cfg, split, data_dir))
            for split in SPLITS if split in builder.info.splits}


def image_caption_dataset(data_cfg, split: str, data_dir) -> grain.MapDataset:
    """Random-access dataset of contract records for `split`, read from `data_dir`
    (`Workdir.data_dir`; None = TFDS's default data dir).

    Only the data stage writes datasets (`build_dataset`): an embedded set that was not built is
    a MissingArtifactError naming `--mode=data`. Any other name must be a TFDS dataset already
    prepared (as ArrayRecord) in the data dir.
    """
    source, spec = _source_and_spec(data_cfg, split, data_dir)
    return records_from_source(source, spec, split)


def _source_and_spec(data_cfg, split: str, data_dir):
    """(random-access source of raw records, how to read them) for `split`."""
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if data_cfg.name in builders.EMBEDDED:
        make = functools.partial(builders.embedded_builder, data_cfg)
        # ArrayRecord reads local files only: a gs:// data dir is read from a local mirror.
        builder = remote.local_builder(make, data_dir) if remote.is_remote(data_dir) \
            else make(data_dir)
        if not builder.is_prepared():
            raise MissingArtifactError(
                f"dataset {data_cfg.name!r} is not built in {data_dir}; run --mode=data "
                "(or --mode=pipeline) first")
        spec = RecordSpec(data_cfg.name, int(data_cfg.image_size), int(data_cfg.max_objects))
    else:
        builder = _standard_builder(data_cfg, data_dir)  # known and prepared (gs:// too)
        if remote.is_remote(data_dir):
            builder = remote.local_builder(
                lambda d: tfds.builder(data_cfg.name, data_dir=d), data_dir)
        spec = _standard_spec(data_cfg, builder.info.features)
    _check_split(split, builder, data_cfg.name)
    try:
        source = builder.as_data_source(split)
    except NotImplementedError as err:  # prepared as TFRecord: no random access
        raise InputError(
            f"TFDS dataset {data_cfg.name!r} in {builder.data_dir} is not in a random-access format "
            f"(need array_record): {err}"
        ) from err
    return source, spec


def _standard_spec(data_cfg, features) -> RecordSpec:
    """RecordSpec for a standard TFDS dataset: which keys hold image and caption (or label)."""
    keys = set(features.keys())
    if data_cfg.image_key not in keys:
        raise InputError(f"data.image_key={data_cfg.image_key!r} not in {data_cfg.name!r} features {sorted(keys)}")
    caption_key, label_names = data_cfg.caption_key, None
    if caption_key and caption_key not in keys:
        logging.warning("%r has no feature %r; building captions from %r", data_cfg.name, caption_key,
                        data_cfg.label_key)
        caption_key = ""
    if not caption_key:
        label = features[data_cfg.label_key] if data_cfg.label_key in keys else None
        if not isinstance(label, tfds.features.ClassLabel):
            raise InputError(
                f"{data_cfg.name!r} has no caption feature {data_cfg.caption_key!r} and no ClassLabel "
                f"data.label_key={data_cfg.label_key!r} (features: {sorted(keys)})"
            )
        label_names = tuple(label.names)
    return RecordSpec(data_cfg.name, int(data_cfg.image_size), int(data_cfg.max_objects),
                      data_cfg.image_key, caption_key, data_cfg.label_key, label_names)


def caption_dataset(data_cfg, split: str, data_dir) -> grain.MapDataset:
    """The captions of `split` alone (str), in record order, without decoding any image, so a
    pass over every caption (data.long_captions) stays cheap."""
    source, spec = _source_and_spec(data_cfg, split, data_dir)

    def caption(index, raw):
        if spec.label_names is not None:
            return to_record(index, raw, spec=spec, split=split)["caption"]
        text = _as_text(raw.get(spec.caption_key))
        if not text or not text.strip():
            _fail(spec, split, index, f"missing or empty caption {spec.caption_key!r}")
        return text

    return grain.MapDataset.source(source).map_with_index(caption)


def records_from_source(source: Sequence[Any], spec: RecordSpec, split: str) -> grain.MapDataset:
    """Map a random-access source of raw dicts to validated contract records."""
    return grain.MapDataset.source(source).map_with_index(functools.partial(to_record, spec=spec, split=split))


def _fail(spec: RecordSpec, split: str, index: int, what: str):
    raise InputError(f"{spec.dataset} split {split!r} record {index}: {what}")


def _as_text(value) -> str | None:
    """str from bytes / str / a 0-d or 1-d array of them (first entry); None when absent."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else (value.reshape(-1)[0] if value.size else None)
    if isinstance(value, dict) and "text" in value:
        return _as_text(value["text"])
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    return None


def _to_rgb_size(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: grayscale repeated, alpha dropped, centre crop, bicubic resize."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[:, :, :3]
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC))


def _decode(data: bytes, spec: RecordSpec, split: str, index: int) -> np.ndarray:
    """RGB uint8 array of an encoded image (JPEG: decoded at a reduced scale close to the target)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (spec.image_size, spec.image_size))  # DCT scaling: decode less for big JPEGs
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        _fail(spec, split, index, f"image bytes do not decode ({e})")


def to_record(index: int, raw: dict, *, spec: RecordSpec, split: str) -> dict:
    """One validated contract record; ValueError naming split and index when it is corrupt."""
    if not isinstance(raw, dict):
        _fail(spec, split, index, f"expected a dict, got {type(raw).__name__}")
    image = raw.get(spec.image_key)
    if image is None:
        _fail(spec, split, index, f"missing image {spec.image_key!r}")
    if isinstance(image, np.ndarray) and image.dtype == object and image.ndim == 0:
        image = image.item()
    if isinstance(image, (bytes, np.bytes_)):  # imported sets keep the encoded file (import_images)
        image = _decode(image, spec, split, index)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or image.size == 0 or image.min() < 0 or image.max() > 255:
            _fail(spec, split, index, f"image must be uint8 (or integers in 0..255), got {image.dtype}")
        image = image.astype(np.uint8)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1 or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        _fail(spec, split, index, f"bad image shape {image.shape}")
    image = _to_rgb_size(image, spec.image_size)

    label = raw.get(spec.label_key, -1)
    label = int(np.asarray(label)) if label is not None else -1
    if spec.label_names is not None:
        if not 0 <= label < len(spec.label_names):
            _fail(spec, split, index, f"label {label} outside the {len(spec.label_names)} class names")
        caption = f"a photo of a {spec.label_names[label].replace('_', ' ')}"
    else:
        caption = _as_text(raw.get(spec.caption_key))
    if not caption or not caption.strip():
        _fail(spec, split, index, f"missing or empty caption {spec.caption_key!r}")

    attributes = raw.get("attributes")
    if attributes is None:
        attributes = np.full((spec.max_objects, 5), -1, np.int32)
    attributes = np.asarray(attributes)
    if attributes.shape != (spec.max_objects, 5) or not np.issubdtype(attributes.dtype, np.integer):
        _fail(spec, split, index, f"attributes must be int [{spec.max_objects}, 5], got {attributes.dtype}{attributes.shape}")
    return {
        "image": image,
        "caption": caption,
        "attributes": attributes.astype(np.int32),
        "label": np.int32(label),
        "index": np.int64(raw.get("index", index)),
    }


def _drop_strings(element: dict) -> dict:
    return {k: v for k, v in element.items() if not isinstance(v, (str, bytes))}


class BlockShuffle(grain.MapDataset):
    """`parent` shuffled in whole blocks of `block` consecutive elements: a fresh order of the
    blocks every epoch (grain's shuffle, seeded by (seed, epoch)), the elements of a block in their
    order. The tail that fills no block is left out.

    Why: the multimodal packer stratifies directions over groups of consecutive rows and the image
    heads' capacity is per group (packing.draw_direction, mmjax/targets.py), so a batch must hold
    whole groups; the blocks themselves are random draws from a shuffled parent.
    """

    def __init__(self, parent: grain.MapDataset, block: int, seed: int):
        super().__init__(parent)
        self._block = int(block)
        self._blocks = grain.MapDataset.range(len(parent) // self._block).shuffle(seed=seed)

    def __len__(self) -> int:
        return len(self._blocks) * self._block

    def __str__(self) -> str:
        return f"BlockShuffle(block={self._block})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, within = divmod(int(index), len(self))
        block = self._blocks[epoch * len(self._blocks) + within // self._block]
        return self._parent[block * self._block + within % self._block]


def batched_iterator(
    ds: grain.MapDataset,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    shuffle_block: int = 1,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    keep_strings: bool = False,
    worker_count: int = 0,
    read_threads: int = 4,
    prefetch_buffer_size: int = 64,
) -> grain.IterDataset:
    """Deterministic, shardable, resumable batches of `ds` for this process.

    `batch_size` is the *global* batch; this process gets `batch_size // process_count` examples
    per batch: its slice of the global batch a single-process run would see (every process yields
    the same number of batches and reads only its own examples). Each epoch is reshuffled (seed, epoch) when
    `shuffle`, in whole blocks of `shuffle_block` consecutive elements (`BlockShuffle`; each
    process's batch must then hold whole blocks); `num_epochs=None` repeats forever. `iter(result)` has `get_state()` / `set_state()`.
    Leaves are stacked numpy arrays; str leaves (captions) are dropped unless `keep_strings`, which
    keeps them as numpy unicode arrays. `worker_count > 0` reads in that many grain processes.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise InputError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise InputError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise InputError(f"num_epochs={num_epochs} must be >= 1 or None (forever)")
    local_batch = batch_size // process_count
    if shuffle_block < 1 or local_batch % shuffle_block:
        raise InputError(f"batch_size={batch_size} over {process_count} process(es) is "
                         f"{local_batch} rows per process: not whole blocks of {shuffle_block} "
                         "(objective.direction_group_rows must divide it)")
    if len(ds) < batch_size and drop_remainder:
        raise InputError(f"dataset of {len(ds)} examples cannot fill one batch of {batch_size}")
    # Shuffle and repeat the *global* dataset, cut it into local-batch chunks and give process p
    # the chunks p, p+n, p+2n, ...: global batch k is then exactly batch k of a single-process run
    # with the same seed, so a multi-host run sees the same data as one host would.
    if shuffle:
        ordered = ds.shuffle(seed=seed) if shuffle_block == 1 else BlockShuffle(ds, shuffle_block, seed)
    else:
        ordered = ds
    ordered = ordered.repeat(num_epochs)
    if not keep_strings:
        ordered = ordered.map(_drop_strings)
    chunks = ordered.batch(local_batch, drop_remainder=drop_remainder)
    if num_epochs is not None:
        chunks = chunks[: len(chunks) // process_count * process_count]
    batched = chunks[process_index::process_count]
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
    out = batched.to_iter_dataset(options)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; notebooks never parse them
            flags.FLAGS.mark_as_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out
