"""Test-wide set-up: CPU only, 8 simulated devices so sharded tests run in the same process, fast
(unoptimised) CPU code generation, and one persistent XLA compilation cache for the whole run.

Why the shared cache: most slow tests start `mmjax.main` (or a bench) as subprocesses at the smoke
size, and each subprocess would compile the same train, eval and sampling programs again; with a
cache shared by the xdist workers and every subprocess they start (through the environment), each
program compiles once per test run. A cached executable is the program the compiler produced, so
no result changes. The directory is made by the first process that loads this file (the xdist
controller, before it starts the workers) and removed by it at the end.
"""
import os
import shutil
import tempfile

from child_env import DEVICE_COUNT_FLAG

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if DEVICE_COUNT_FLAG not in flags:
    flags += f" {DEVICE_COUNT_FLAG}=8"
# LLVM at -O0: the suite compiles hundreds of small programs and runs each a few steps, so
# compiling is most of its time (the whole suite on 2 cores: 1583 s -> 1050 s, 2026-12-07). Every
# equivalence a test checks runs both sides under the same flags. Children inherit it
# (tests/child_env.py).
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="mmjax_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    # smoke programs compile in well under JAX's default 1 s threshold; cache them all
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
