"""JAX's persistent compilation cache, shared by `mmjax.main` and the scaling sweep.

Why: compiling the train step of a large model takes minutes, and a resumed or requeued job (or
the next grid point of a sweep with the same shapes) would compile the same programs again. With
the cache, a rerun loads them from disk (or a bucket: JAX stores the cache through etils.epath).
"""
from __future__ import annotations

import logging
import os

from mmjax import io

OFF = "off"


def enable(directory) -> str:
    """Caches every compiled program in `directory` (created if local); returns the directory in
    use, or "" when it cannot be created. A cache the user configured (JAX_COMPILATION_CACHE_DIR,
    or an earlier call) is kept.

    Why a failure is only a warning: the cache saves compile time and nothing else, so it must not
    be the error a user sees for an unwritable workdir; the stage that writes its outputs there
    names the real problem (e.g. the checkpoint directory) in one line.
    """
    import jax
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    directory = os.fspath(directory)
    try:
        io.make_dirs(directory)
    except io.StorageError as e:
        logging.warning("running without a persistent compilation cache: %s", e)
        return ""
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every program: the smallest ones still cost a compile on each resume.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logging.info("persistent compilation cache: %s", directory)
    return directory


def directory_for(config, workdir) -> str:
    """`train.compilation_cache_dir` resolved: "" -> <workdir>/jax_cache, "off" -> ""."""
    from mmjax.workdir import Workdir
    train = config.get("train", {}) if hasattr(config, "get") else {}
    value = str(train.get("compilation_cache_dir", "") or "")
    if value == OFF:
        return ""
    if value:
        return value
    wd = workdir if isinstance(workdir, Workdir) else Workdir.from_config(config, workdir)
    return os.fspath(wd.compilation_cache)
