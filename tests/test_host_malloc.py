"""mesh.malloc_hugepages: the command line restarts itself once with glibc's huge-page malloc
tunable, and the tunable really cuts the page faults of a large block mapped afresh (what XLA
CPU's per-step temp buffer costs)."""
import os
import subprocess
import sys

import pytest
from child_env import child_env

from mmjax import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hugepage_environ_adds_the_tunable_once_and_keeps_the_users():
    on, env = f"{host_malloc.TUNABLE}=1", host_malloc.hugepage_environ
    assert env({"A": "1"}, (2, 36), "madvise") == {"A": "1", host_malloc.ENV: on}
    kept = env({host_malloc.ENV: "glibc.malloc.arena_max=2"}, (2, 35), "madvise")
    assert kept == {host_malloc.ENV: f"glibc.malloc.arena_max=2:{on}"}
    for users in (on, f"{host_malloc.TUNABLE}=0", f"glibc.malloc.arena_max=2:{host_malloc.TUNABLE}=0"):
        assert env({host_malloc.ENV: users}, (2, 36), "madvise") is None
    assert env({}, (2, 34), "madvise") is None  # too old to read it: no restart
    assert env({}, None, "madvise") is None  # not glibc
    for thp in ("always", "never", None):  # huge pages without the madvise, or none at all
        assert env({}, (2, 36), thp) is None


# A child that maps, fills and frees a 64 MiB block 4 times (above glibc's 32 MB mmap ceiling,
# like the demo's 69.6 MB temp buffer) and prints its minor page faults.
FILL = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(ctypes.c_void_p(p))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _env(tunables: str | None) -> dict[str, str]:
    """A child's environment with exactly these GLIBC_TUNABLES (none: unset)."""
    env = child_env(drop_prefixes=(host_malloc.ENV,))
    if tunables:
        env[host_malloc.ENV] = tunables
    return env


def _faults(tunables: str | None) -> int:
    done = subprocess.run([sys.executable, "-c", FILL], env=_env(tunables), capture_output=True, text=True,
                          timeout=60, check=True)
    return int(done.stdout.strip())


RESTARTS = host_malloc.hugepage_environ({}, host_malloc.glibc_version(), host_malloc.thp_mode())
NO_RESTART = (f"the tunable cannot help here (glibc {host_malloc.glibc_version()}, transparent huge "
              f"pages {host_malloc.thp_mode()}): the CLI does not restart")


@pytest.mark.skipif(RESTARTS is None, reason=NO_RESTART)
def test_the_tunable_cuts_the_page_faults_of_a_fresh_large_block():
    plain = _faults(None)
    huge = _faults(f"{host_malloc.TUNABLE}=1")
    assert plain > 4 * (64 << 20) // 4096 // 2, plain  # 4 KiB pages: ~16k faults per block
    assert huge * 10 < plain, (huge, plain)


# The real command line with the stage work replaced by a report of the process it runs in: the
# pid and GLIBC_TUNABLES at start (printed once before and once after a restart), and when the
# stages are reached.
REPORT = """
import os, sys
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
from mmjax import main, stages
stages.run_mode = lambda config, workdir, mode: print("stages", os.getpid(),
                                                      os.environ.get("GLIBC_TUNABLES"), flush=True)
sys.argv = ["mmjax", "--config=configs/fsq_shapes.py:smoke", "--workdir=" + sys.argv[1], *sys.argv[2:]]
main.entry()
"""


def _cli_report(tmp_path, *args: str, tunables: str | None = None) -> list[list[str]]:
    done = subprocess.run([sys.executable, "-c", REPORT, str(tmp_path), *args], env=_env(tunables),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split() for line in done.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(RESTARTS is None, reason=NO_RESTART)
def test_the_cli_restarts_once_with_the_tunable_unless_told_not_to(tmp_path):
    on = f"{host_malloc.TUNABLE}=1"
    first, again, stages = _cli_report(tmp_path)
    assert first[:3] == ["start", first[1], "None"]
    assert again == ["start", first[1], on] and stages == ["stages", first[1], on]

    off = _cli_report(tmp_path, "--config.mesh.malloc_hugepages=False")
    assert [line[0] for line in off] == ["start", "stages"] and off[1][2] == "None"

    users = f"{host_malloc.TUNABLE}=0"  # the user's own choice: kept, no restart
    kept = _cli_report(tmp_path, tunables=users)
    assert [line[0] for line in kept] == ["start", "stages"] and kept[1][2] == users
