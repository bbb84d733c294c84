"""mmjax command line: one entry point for every stage, configured by an ml_collections file.

Examples (`mmjax` is the same program as `python -m mmjax.main`):

  mmjax --config=configs/mot_shapes.py:demo --workdir=/tmp/mmjax_demo
  mmjax --config=configs/mot_shapes.py:demo,discrete --workdir=/tmp/disc --mode=model
  mmjax --config=configs/fsq_shapes.py:smoke --workdir=/tmp/fsq --mode=tokenizer
        --config.fsq.levels='(8,8,8,5,5,5)' --config.tokenizer_train.steps=100
  mmjax --config=configs/mot_shapes.py:1b --workdir=gs://BUCKET/run --mode=model

--mode picks the stages of the data flow: data -> tokenizer -> tokenize -> model -> sample
(`eval` = sample); `pipeline` (the default) runs all that the config has blocks for. Every stage
resumes or skips finished work. Multi-host: --coordinator_address, --num_processes, --process_id
(or MMJAX_COORDINATOR / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID, or MMJAX_DISTRIBUTED_AUTO=1 to let
JAX detect TPU pods and SLURM).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mmjax.errors import InputError, MmjaxError

MODES = ("pipeline", "data", "tokenizer", "tokenize", "model", "sample", "eval")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mot_shapes.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "pipeline", MODES, "Which stage(s) to run.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")


def run(config, workdir: str, mode: str) -> dict:
    """Runs `mode` and returns the stages' results (used by tests and notebooks too)."""
    from mmjax import cloud, config_validation, stages
    cloud.configure()  # STORAGE_EMULATOR_HOST -> every storage client's settings
    config_validation.validate(config)
    return stages.run_mode(config, workdir, mode)


class _QuietLibraries(logging.Filter):
    """Shows mmjax's INFO lines but only warnings and errors from libraries (orbax is chatty)."""

    NOISE = ("Using custom data configuration", "read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        if "/mmjax/" in record.pathname.replace("\\", "/"):
            return True
        message = str(record.msg)
        if not os.environ.get("MMJAX_TRACEBACK"):  # a library's error stays one line; the
            record.exc_info, record.exc_text = None, None  # cause reaches the user via entry()
        return record.levelno >= logging.WARNING and not any(n in message for n in self.NOISE)


def _configure_logging() -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.addFilter(_QuietLibraries())


class UsageError(InputError):
    """A missing or malformed command-line argument (one line, exit code 2; not absl's usage dump)."""


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag (or a config file whose get_config raises) is one line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # Errors inside a config file arrive as a multi-line traceback; its last line says what.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        head = lines[0].split(": Error whilst parsing config file")[0].removeprefix("flag ")
        detail = f": {lines[-1]}" if len(lines) > 1 else ""
        print(f"mmjax: error: {head}{detail}", file=sys.stderr)
        sys.exit(2)


def _check_args(argv) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise UsageError("--config is required, e.g. --config=configs/mot_shapes.py:demo")
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]  # drop ":arg"
    if not os.path.isfile(path):
        raise UsageError(f"--config: no such config file {path!r}")
    if not FLAGS.workdir:
        raise UsageError("--workdir is required")


def main(argv) -> None:
    _check_args(argv)
    if (FLAGS.config.get("mesh") or {}).get("malloc_hugepages") is True:  # no mesh: not a run
        from mmjax import host_malloc  # glibc reads it only at start: restart before any import
        host_malloc.restart_with_hugepages()  # of JAX or I/O (the flags parse again, ~0.3 s)
    from mmjax import cloud
    cloud.configure()  # before any storage client is imported (gcsfs reads its env at import)
    from mmjax import config_validation
    config_validation.validate(FLAGS.config)  # before importing jax: a bad value fails at once
    _configure_logging()
    cloud.check_path(FLAGS.workdir, write=True)  # no credentials / no bucket: one line, at once
    from mmjax import compilation_cache, parallel
    parallel.split_cpu_host(int(FLAGS.config.mesh.get("cpu_devices", 0)))
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    cache = compilation_cache.directory_for(FLAGS.config, FLAGS.workdir)
    if cache:
        compilation_cache.enable(cache)
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _fail(error: BaseException, code: int) -> None:
    """Prints the error in one line and exits; library clean-up failing after it (e.g. an event
    file flush on a full disk) is reported in one line too, not as a traceback."""
    import threading

    def quiet(what):
        return lambda info: print(f"mmjax: warning: {what}: {info.exc_type.__name__}: "
                                  f"{_one_line(info.exc_value)}", file=sys.stderr)

    print(f"mmjax: error: {_one_line(error)}", file=sys.stderr)
    sys.unraisablehook = quiet("during shutdown")
    threading.excepthook = quiet("in a background thread")
    sys.exit(code)


def entry() -> None:
    """Turns mmjax's own errors (mmjax.errors: bad config values, stages run out of order,
    unreadable files) into one clear line (exit code 2) instead of a traceback; any other
    exception is a bug and keeps its traceback.

    A non-finite loss under train.nan_policy='stop' is one line too, with exit code 1 (the run
    failed; the input was fine). MMJAX_TRACEBACK=1 shows the traceback instead.
    """
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module.__doc__ is None:  # the `mmjax` console script:
        main_module.__doc__ = __doc__  # absl's --help prints the __main__ docstring and the
        sys.argv[0] = __name__  # flags of the module named by argv[0]
    try:
        app.run(main, flags_parser=_parse_flags)
    except SystemExit as e:
        if e.code == 1 and {"--help", "-h", "--helpshort", "--helpfull"} & set(sys.argv[1:]):
            sys.exit(0)  # absl exits 1 after printing help; asking for help is not a failure
        raise
    except (AttributeError, KeyError) as e:
        # ml_collections raises these while applying a --config.x.y=... override to a field that
        # does not exist; name the override instead of showing a traceback.
        field = str(e).strip("\"'")
        bad = [a for a in sys.argv[1:] if a.startswith("--config.") and f".{field}" in a]
        if not bad:
            raise
        print(f"mmjax: error: {bad[0].split('=')[0]}: no such config field {field!r}",
              file=sys.stderr)
        sys.exit(2)
    except MmjaxError as e:
        if os.environ.get("MMJAX_TRACEBACK"):
            raise
        _fail(e, 2)
    except FloatingPointError as e:  # train.NonFiniteLossError: a failed run, not a bad input
        if os.environ.get("MMJAX_TRACEBACK"):
            raise
        _fail(e, 1)
    except RuntimeError as e:
        from mmjax.train import Preempted
        if not isinstance(e, Preempted):
            raise
        _fail(e, 143)


if __name__ == "__main__":
    entry()
