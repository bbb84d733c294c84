"""TFDS datasets in a bucket: built locally and uploaded, read from a local mirror.

Why: TFDS writes (and grain reads) ArrayRecord through riegeli, which opens local files only, so
`data_dir=gs://...` fails inside TFDS ("open() failed ... Failed to create the file header"). The
data stage therefore prepares a dataset in a local cache and copies its version directory to the
bucket, `dataset_info.json` last (TFDS's "prepared" marker, so a killed upload never looks
complete). Readers copy that directory back into the local cache once and open it there. The
cache is keyed by the remote data dir; a prepared TFDS version directory never changes.
"""
from __future__ import annotations

import logging
from typing import Callable

from mmjax import cloud, io

MARKER = "dataset_info.json"  # written last by TFDS and by us: a variant dir is complete


def is_remote(data_dir) -> bool:
    return data_dir is not None and cloud.is_remote(data_dir)


def local_root(data_dir) -> str:
    """The local cache that mirrors the remote data dir `data_dir`."""
    return io.cache_dir_for(data_dir, "tfds")


def publish(make: Callable[[str], object], data_dir, prepare: Callable[[object], None]):
    """Makes the dataset of `make(dir) -> builder` prepared in the remote `data_dir`: prepares it
    locally with `prepare(builder)` (once) and uploads the version directory. Returns the remote
    builder."""
    remote = make(str(data_dir))
    if remote.is_prepared():
        return remote
    local = make(local_root(data_dir))
    if not local.is_prepared():
        prepare(local)
    logging.info("uploading %s to %s", local.data_path, remote.data_path)
    io.copy_tree(local.data_path, remote.data_path, last=MARKER)
    return make(str(data_dir))


def local_builder(make: Callable[[str], object], data_dir):
    """`make(data_dir)`, or for a remote `data_dir` whose dataset is prepared there, the same
    builder over a local mirror (downloaded once). An unprepared remote builder is returned as it
    is, so callers report it as not built."""
    remote = make(str(data_dir))
    if not remote.is_prepared():
        return remote
    local = make(local_root(data_dir))
    if not local.is_prepared():
        logging.info("copying %s to the local cache %s", remote.data_path, local.data_path)
        io.copy_tree(remote.data_path, local.data_path, last=MARKER)
        local = make(local_root(data_dir))
    return local
