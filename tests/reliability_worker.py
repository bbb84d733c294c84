"""The real CLI (`mmjax.main.entry`) training the toy task of tests/test_train.py (not run by pytest).

Why: the reliability tests kill, preempt, starve and poison a *real* training process, which must
start in seconds; the toy task does, the tokenizer would take ~30 s. Everything but the task is
the production path: flag parsing, config validation, the trainer, orbax checkpoints and the
one-line error handling of `mmjax.main.entry`.

  python tests/reliability_worker.py --config=tests/reliability_worker.py:STEPS --workdir=DIR \
      [--config.train.checkpoint_every=3] [--config.worker.step_delay=0.1] ...

This file is also that config file: `get_config` is the toy config of tests/test_train.py on one
device, plus a `worker` block read only here.
"""
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from child_env import xla_flags_with_device_count  # noqa: E402

# 1 device(s), after the flags the test passed on (child_env: no count of its own)
os.environ["XLA_FLAGS"] = xla_flags_with_device_count(os.environ.get("XLA_FLAGS", ""), 1)


def get_config(arg: str = "12"):
    import ml_collections
    from test_train import toy_config

    config = toy_config(steps=int(arg))
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    config.worker = ml_collections.ConfigDict(dict(
        step_delay=0.0,  # Seconds slept before every step, so a test can signal mid-run.
        nan_index=-1,  # >= 0: this train record's target is inf (poisons the steps that read it).
        as_stage=False,  # True: end like a stage does (a preempted run raises, the CLI exits 143).
    ))
    return config


def _run_toy(config, workdir: str, mode: str) -> dict:
    """Stands in for `stages.run_mode`: the toy task through the generic trainer."""
    from mmjax import parallel, train
    from test_train import ToyTask

    delay = float(config.worker.step_delay)
    if delay > 0:
        shard_batch = parallel.shard_batch

        def slow_shard_batch(batch, mesh):  # called once per train step by the loop
            time.sleep(delay)
            return shard_batch(batch, mesh)

        parallel.shard_batch = slow_shard_batch
    nan_index = int(config.worker.nan_index)
    summary = train.train(config, workdir, ToyTask(nan_index if nan_index >= 0 else None).build(config))
    print(f"WORKER_DONE step={summary['step']} preempted={summary['preempted']}", flush=True)
    if config.worker.as_stage:
        from mmjax.stages.common import finished
        finished(summary, "toy training")
    return summary


def main() -> None:
    from mmjax import main as cli, stages
    stages.run_mode = _run_toy
    cli.entry()


if __name__ == "__main__":
    main()
