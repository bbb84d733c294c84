"""Cloud storage set-up: what `STORAGE_EMULATOR_HOST` implies for every client, and an early probe.

Why one module: four clients touch a gs:// workdir (gcsfs behind etils.epath for small files and
TFDS, tensorstore behind orbax for arrays, google-cloud-storage behind tensorboardX), and each
learns about a custom endpoint differently. gcsfs and google-cloud-storage read
`STORAGE_EMULATOR_HOST` themselves; tensorstore reads `TENSORSTORE_GCS_HTTP_URL` (without it,
it talks to storage.googleapis.com and hangs offline) and looks for credentials unless
`GOOGLE_AUTH_TOKEN_FOR_TESTING` is set; gcsfs would ask the storage-control API (which needs real
credentials) for the bucket layout unless `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`. `configure`
derives all of that from the one variable a user sets, so setting `STORAGE_EMULATOR_HOST` alone
is enough. It runs in `mmjax.main` before anything imports a storage client, and again (a no-op
then) from the Python entry points (`main.run`, `stages.run_mode`, the sweep).

`check_path` turns the two common mistakes into one line each, before any stage starts: no
credentials (and no emulator), and a bucket that does not exist (gcsfs would otherwise *create*
a missing bucket on the first mkdir, or retry for minutes).
"""
from __future__ import annotations

import os
import re
import uuid

from mmjax.errors import StorageError

EMULATOR = "STORAGE_EMULATOR_HOST"
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path) -> bool:
    """True for URLs such as gs://bucket/x (object stores: no directories, no appends, no rename)."""
    return bool(_REMOTE.match(os.fspath(path)))


def emulator_url() -> str:
    """The emulator endpoint as an http(s) URL, or "" when none is configured."""
    host = os.environ.get(EMULATOR, "").strip()
    if host in ("", "default"):
        return ""
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def derived_environment(url: str) -> dict[str, str]:
    """The variables each storage client needs to talk to the emulator at `url` (see module doc)."""
    return {
        EMULATOR: url,
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays: tensorstore's GCS driver endpoint
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed token, no ADC lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: skip the storage-control lookup
    }


def configure() -> dict[str, str]:
    """Derives every client's emulator settings from STORAGE_EMULATOR_HOST (values the user set
    explicitly win); returns what was set. Without an emulator this does nothing."""
    url = emulator_url()
    if not url:
        return {}
    derived = derived_environment(url)
    os.environ[EMULATOR] = url
    for key, value in derived.items():
        os.environ.setdefault(key, value)
    try:
        import fsspec
    except ImportError:
        return derived
    # gcsfs: anonymous requests (the emulator checks no token; the default chain would look for
    # gcloud credentials and the metadata server first).
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("token", "anon")
    return derived


def bucket_of(path) -> str:
    return re.sub(_REMOTE, "", os.fspath(path)).split("/", 1)[0]


def _filesystem(path):
    try:
        import fsspec
        return fsspec.filesystem("gs")
    except (ImportError, ValueError) as e:
        raise StorageError(f"{os.fspath(path)}: gs:// paths need gcsfs and google-cloud-storage "
                           "(pip install 'mmjax[gcs]')") from e


def _require_credentials(path) -> None:
    """Application Default Credentials must exist unless an emulator is configured."""
    if emulator_url():
        return
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError as e:
        raise StorageError(f"{os.fspath(path)}: gs:// paths need google-auth "
                           "(pip install 'mmjax[gcs]')") from e
    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        raise StorageError(
            f"{os.fspath(path)}: no Google Cloud credentials found (run `gcloud auth "
            "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or run on a GCP VM) "
            f"and no {EMULATOR} is set") from e


def write_probe(directory: str) -> str:
    """A fresh file name under `directory` to test writing with. Unique per call: processes (and
    threads) that probe one shared directory at once must not delete each other's probe."""
    return f"{directory.rstrip('/')}/.mmjax_write_probe-{uuid.uuid4().hex[:8]}"


def check_path(path, *, write: bool = False) -> None:
    """For a gs:// path: credentials exist, its bucket exists and (write=True) an object can be
    written there. Local paths and other schemes pass through (their errors name them later)."""
    text = os.fspath(path)
    if not text.startswith("gs://"):
        return
    configure()
    _require_credentials(text)
    bucket = bucket_of(text)
    fs = _filesystem(text)
    try:
        fs.info(bucket)
    except FileNotFoundError as e:
        raise StorageError(f"{text}: bucket gs://{bucket} does not exist (create it first, e.g. "
                           f"`gcloud storage buckets create gs://{bucket}`)") from e
    except Exception as e:  # noqa: BLE001 - permissions, network: one line naming the path
        raise StorageError(f"{text}: cannot reach bucket gs://{bucket}: "
                           f"{type(e).__name__}: {e}") from e
    if write:
        probe = write_probe(text)
        try:
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"{text}: cannot write to gs://{bucket}: "
                               f"{type(e).__name__}: {e}") from e


def check_workdir(workdir) -> None:
    """`check_path` for a Workdir: its root writable, every overridden gs:// input's bucket there
    (each bucket probed once). Configures the emulator first (idempotent)."""
    configure()
    check_path(workdir.root, write=True)
    seen = {bucket_of(workdir.root)} if is_remote(workdir.root) else set()
    for path in (workdir.data_dir, workdir.sp_model, workdir.tokenizer_checkpoints,
                 workdir.image_tokens):
        if path is not None and is_remote(path) and bucket_of(path) not in seen:
            seen.add(bucket_of(path))
            check_path(path)


def check_shared(workdir) -> None:
    """Multi-process runs: every process must see the workdir process 0 writes (a shared mount or
    a bucket). Process 0 writes a fresh id into <root>/.mmjax_workdir_id; a process that then does
    not read that id fails with one line naming the path, instead of waiting at a later barrier
    for artifacts it will never see, and the other processes stop too. A broadcast, a barrier and
    one agreement; single-process runs skip it."""
    import jax
    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    from mmjax import io, multihost
    nonce = np.frombuffer(uuid.uuid4().bytes[:4], np.int32)
    nonce = str(int(multihost_utils.broadcast_one_to_all(nonce)[0]))
    marker = io.as_path(workdir.root) / ".mmjax_workdir_id"
    if jax.process_index() == 0:
        io.write_text_atomic(marker, nonce)
    multihost_utils.sync_global_devices("mmjax_workdir_id_written")

    def see_marker():
        try:
            seen = marker.read_text() if marker.exists() else None
        except OSError as e:
            seen = f"unreadable ({e})"
        if seen != nonce:
            raise StorageError(
                f"{workdir.root}: process {jax.process_index()} of {jax.process_count()} cannot "
                f"see the workdir process 0 writes (its {marker.name} is "
                f"{'missing' if seen is None else 'stale'} here); give every host the same shared "
                "directory or a gs:// bucket")

    # Every process agrees: the blind host names its path, the others stop too (instead of
    # building data and then waiting in a collective for a peer that has already left).
    multihost.together("the shared workdir check", see_marker)
