"""What building the model's packed batches costs, and what that costs the model stage, on the
demo's 2 cores.

  python -m bench.data_loading                              # demo, 3 rounds
  python -m bench.data_loading --base=DEMO_WORKDIR --rounds=3 --read_threads=1,4

Why: the trainer builds each batch in Python on the host (mmjax.data.packing) while XLA runs the
step on the same cores, so every millisecond of CPU the loader spends is taken from the step, and
loader threads beyond the cores XLA leaves free contend for the GIL.
- Part 1, in this process (nothing else running): wall and CPU time per batch of the trainer's
  packed-row iterator at each --read_threads, and of one row built on its own.
- Part 2: the model stage through the `mmjax` command in fresh workdirs (bench.common.timed_stage),
  at each data.read_threads, alternating within each round so the host's drift hits all alike:
  steps/s after the compile, user and system CPU of the process.
--base reuses a finished demo's data, tokenizer and image tokens (the loader's cost does not
depend on their quality); without it a short tokenizer is built. Writes
bench/results/data_loading.json.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags

from bench.common import alternating_runs, load_config, round_summary, stage_base, write_results

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/mot_shapes.py:demo", "Config the model stage runs with.")
flags.DEFINE_string("base", None, "A workdir holding finished data/, tokenizer/, image_tokens/.")
flags.DEFINE_list("read_threads", ["1", "4"], "data.read_threads values compared.")
flags.DEFINE_integer("batches", 200, "Batches timed per iterator in part 1.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds of part 2 (0: part 1 only).")
flags.DEFINE_integer("model_steps", 300, "Model steps per part-2 measurement.")
flags.DEFINE_string("workdir", "/tmp/mmjax_bench_data_loading", "Root of the runs' workdirs.")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/data_loading.json).")


def _timed(fn, repeats: int) -> dict:
    """Mean wall and CPU milliseconds of `repeats` calls of `fn` (CPU: every thread of this
    process, so a loader's worker threads are counted)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return {"wall_ms": (time.perf_counter() - wall) / repeats * 1e3,
            "cpu_ms": (time.process_time() - cpu) / repeats * 1e3}


def loader_costs(config_spec: str, base: str, threads: list[int], batches: int) -> dict:
    """Part 1: per-row and per-batch costs of the train split's packed rows, as the trainer
    reads them (mmjax.train.train's batched_iterator arguments)."""
    from mmjax.data.pipeline import batched_iterator
    from mmjax.stages.model import build_task
    from mmjax.workdir import Workdir
    config = load_config(config_spec)
    ds = build_task(config, Workdir.from_config(config, base)).dataset("train", train=True)
    ds[0]  # opens the record and token files
    rows = min(len(ds), 16 * batches)
    indices = iter(range(rows))
    out = {"batch_size": int(config.train.batch_size),
           "row": _timed(lambda: ds[next(indices)], rows)}
    for n in threads:
        iterator = iter(batched_iterator(ds, int(config.train.batch_size),
                                         seed=config.data.shuffle_seed, shuffle=True,
                                         shuffle_block=int(getattr(ds, "group_rows", 1)),
                                         read_threads=n))
        next(iterator)  # threads started, buffer filling
        out[f"batch_{n}_threads"] = _timed(lambda: next(iterator), batches)
        print(f"{n} read thread(s): {out[f'batch_{n}_threads']}", flush=True)
    return out


def main(_):
    threads = [int(t) for t in FLAGS.read_threads]
    base = stage_base(FLAGS.config, FLAGS.base, FLAGS.workdir)
    results = {"config": FLAGS.config, "rounds": FLAGS.rounds, "model_steps": FLAGS.model_steps,
               "command": "python -m bench.data_loading " + " ".join(sys.argv[1:]),
               "loader": loader_costs(FLAGS.config, base, threads, FLAGS.batches)}
    if FLAGS.rounds:
        settings = {f"{n}_threads": (f"--config.data.read_threads={n}",) for n in threads}
        runs = alternating_runs(FLAGS.config, base, FLAGS.workdir, "model", FLAGS.model_steps,
                                settings, FLAGS.rounds)
        results["model_stage"] = {name: round_summary(r) for name, r in runs.items()}
        first, *others = settings
        results["model_stage"]["steps_per_sec_over_first"] = {
            name: [r["steps_per_sec"] / f["steps_per_sec"] for f, r in zip(runs[first], runs[name])]
            for name in others}
    write_results("data_loading", results, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
