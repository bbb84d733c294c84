"""glibc malloc on transparent huge pages for the command line's process (mesh.malloc_hugepages).

Why: XLA CPU mallocs each executable's temp buffer afresh at every run (the demo's train step:
69.6 MB per device, `compiled.memory_analysis()`). That is above glibc's 32 MB mmap ceiling, so
each step maps new memory and the kernel backs it with 4 KiB pages on first touch: ~35,000 minor
page faults per demo step, a fifth of the model stage's CPU time spent in the kernel. glibc's
`glibc.malloc.hugetlb=1` tunable marks the memory it maps MADV_HUGEPAGE, so where transparent huge
pages are in `madvise` mode (Debian's and Ubuntu's default) the same buffer takes a few dozen
2 MiB faults: the demo's model stage then takes ~1,800 faults per step instead of ~35,000, a
third of the system CPU time, and trains 1.25x faster (1.19-1.38x over 3 alternating rounds; its
tokenizer stage, whose buffers stay under the ceiling, 0.97x: 0.92-1.01x;
`python -m bench.host_malloc`, bench/results/host_malloc.json).

glibc reads tunables once, when the process starts, so the command line re-executes itself with
the variable set before it imports JAX. Nothing else changes: the same program, arguments and
pid; results are bitwise those of a run without it (the demo's losses and accuracies are). It
restarts only where it can help (glibc >= 2.35, huge pages in `madvise` mode), and a
`glibc.malloc.hugetlb` the user set wins.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Mapping

ENV = "GLIBC_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb"
FIRST_GLIBC = (2, 35)  # the first glibc that reads the tunable (older ones ignore it)
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode: 'madvise' (the tunable takes effect), 'always'
    (huge pages without it), 'never', or None where the kernel does not say."""
    try:
        with open(THP_MODE_FILE) as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return None


def glibc_version() -> tuple[int, ...] | None:
    """The running C library's glibc version, or None (musl, macOS, Windows)."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError, TypeError):
        return None
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def hugepage_environ(environ: Mapping[str, str], glibc: tuple[int, ...] | None,
                     thp: str | None) -> dict | None:
    """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None when there is
    nothing to change: no glibc that reads it, a kernel whose huge pages do not wait for the
    madvise (`always`: they come anyway; `never`), or the user chose a value already."""
    if glibc is None or glibc < FIRST_GLIBC or thp != "madvise":
        return None
    tunables = [t for t in environ.get(ENV, "").split(":") if t]
    if any(t.split("=", 1)[0] == TUNABLE for t in tunables):
        return None
    return {**environ, ENV: ":".join([*tunables, f"{TUNABLE}=1"])}


def restart_with_hugepages() -> None:
    """Re-executes this process (same interpreter, flags and arguments) with the tunable set;
    returns without doing anything where `hugepage_environ` changes nothing."""
    environ = hugepage_environ(os.environ, glibc_version(), thp_mode())
    if environ is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
