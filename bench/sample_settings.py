"""Text->image sampling settings (CFG scale and schedule, flow temperature, ODE solver and steps)
compared on finished runs, one per training seed, paired on the same checkpoints and prompts.

  python -m bench.sample_settings --workdirs=/tmp/d0,/tmp/d1,/tmp/d2 \\
      --setting=default: --setting=cfg1.5:cfg_scale=1.5 \\
      --setting=linear3:cfg_schedule=linear,cfg_scale=3

Why a separate tool: picking sampling knobs on the test prompts the README quotes would flatter
the quoted figures, so this scores the VALIDATION split by default (`--split=test` to report).
Each `--setting` is NAME:FIELD=VALUE[,FIELD=VALUE...] over the run's `sample` block (validated
as the sample stage validates it); the first setting is the reference. For every workdir and
setting: the first `--num_prompts` captions of the split -> images (sample seed `--seed`, the
sample stage's prompts and sampler) -> the shapes rule checker (whole prompt, object, shape,
count, with 95% Wilson intervals). The summary gives each setting's mean over workdirs and its
paired difference from the reference per workdir: differences inside the seed spread are noise.

Writes bench/results/sample_settings.json (or --out).
"""
from __future__ import annotations

import ast
import time

import numpy as np
from absl import app, flags

from bench.common import write_results

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Finished shapes runs (one per training seed).")
flags.DEFINE_multi_string("setting", ["default:"], "NAME:FIELD=VALUE[,FIELD=VALUE...] over the "
                          "`sample` block; the first is the reference.")
flags.DEFINE_enum("split", "validation", ["validation", "test"], "Whose captions are the prompts.")
flags.DEFINE_integer("num_prompts", 512, "Prompts per workdir and setting (the first of the split).")
flags.DEFINE_integer("seed", 0, "Sampling seed (the sample stage's t2i uses sample.seed, 0).")
flags.DEFINE_string("out", None, "Output JSON (default bench/results/sample_settings.json).")

SCORES = ("prompt_acc", "object_acc", "shape_acc", "count_acc")  # shapes_checker keys reported


def parse_setting(spec: str) -> tuple[str, dict]:
    """'NAME:k=v,k=v' -> (NAME, {k: literal v}); values that are not Python literals stay strings."""
    name, sep, body = spec.partition(":")
    if not sep or not name:
        raise app.UsageError(f"--setting {spec!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE...]")
    overrides = {}
    for item in filter(None, body.split(",")):
        field, eq, value = item.partition("=")
        if not eq:
            raise app.UsageError(f"--setting {spec!r}: {item!r} is not FIELD=VALUE")
        try:
            overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[field] = value
    return name, overrides


def settings_for(run, name: str, overrides: dict):
    """The run's sampling settings with `overrides`, checked like a config's `sample` block."""
    from mmjax import config_validation
    sample = run.config.sample.copy_and_resolve_references()
    for field, value in overrides.items():
        if field not in sample:
            raise app.UsageError(f"--setting {name}: no sample field {field!r}")
        sample[field] = type(sample[field])(value)
    return config_validation.sample_settings(sample)


def score_setting(run, records, settings, seed: int) -> dict:
    """Rule-checker scores (with Wilson intervals) of text->image samples for the records."""
    from mmjax.evals import shapes_checker
    from mmjax.stages import sample as sample_stage
    ids, lengths = sample_stage.prompts_of(run, records)
    t0 = time.perf_counter()
    images = run.pixels(run.image_tokens_for(ids, lengths, seed=seed, settings=settings))
    scores = shapes_checker.score_batch(images, np.stack([r["attributes"] for r in records]))
    out = {k: float(v) for k, v in scores.items()
           if k.removesuffix("_lo").removesuffix("_hi").removesuffix("_n") in SCORES}
    return {**out, "seconds": time.perf_counter() - t0}


def compare(workdirs, settings, split: str, num_prompts: int, seed: int) -> dict:
    """Rows (workdir x setting) and a per-setting summary: means and paired differences."""
    import mmjax
    from mmjax.data import pipeline
    rows = []
    for workdir in workdirs:
        run = mmjax.load(workdir)
        if run.config.data.name != "shapes":
            raise app.UsageError(f"{workdir}: data.name={run.config.data.name!r}; the rule "
                                 "checker scores only shapes runs")
        dataset = pipeline.image_caption_dataset(run.config.data, split, run.workdir.data_dir)
        records = [dataset[i] for i in range(min(num_prompts, len(dataset)))]
        for name, overrides in settings:
            row = {"workdir": workdir, "setting": name, "overrides": overrides,
                   "step": int(run.step), "prompts": len(records),
                   **score_setting(run, records, settings_for(run, name, overrides), seed)}
            rows.append(row)
            print(f"{workdir} {name}: " + ", ".join(f"{k}={row[k]:.4f}" for k in SCORES),
                  flush=True)
    return {"rows": rows, "summary": summarize(rows, [name for name, _ in settings])}


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Per setting: the mean of each score over workdirs, and per workdir its difference from
    the first setting's score on the same checkpoint (points)."""
    by = {(r["workdir"], r["setting"]): r for r in rows}
    workdirs = list(dict.fromkeys(r["workdir"] for r in rows))
    summary = {}
    for name in names:
        summary[name] = {
            key: {"mean": float(np.mean([by[w, name][key] for w in workdirs])),
                  "paired_diff_points": [round(100 * (by[w, name][key] - by[w, names[0]][key]), 2)
                                         for w in workdirs]}
            for key in SCORES}
    return summary


def main(argv):
    del argv
    if not FLAGS.workdirs:
        raise app.UsageError("--workdirs: give at least one finished run")
    settings = [parse_setting(s) for s in FLAGS.setting]
    if len({name for name, _ in settings}) != len(settings):
        raise app.UsageError(f"--setting: names repeat in {[n for n, _ in settings]}")
    results = compare(FLAGS.workdirs, settings, FLAGS.split, FLAGS.num_prompts, FLAGS.seed)
    write_results("sample_settings", {"split": FLAGS.split, "num_prompts": FLAGS.num_prompts,
                                      "seed": FLAGS.seed, "settings": FLAGS.setting, **results},
                  out=FLAGS.out)


if __name__ == "__main__":
    app.run(main)
