"""Bad input to `python -m mmjax.main` gives one clear line and exit code 2, never a traceback.

Every case is a real subprocess of its own test, so pytest-xdist spreads them over its workers
(most fail in config validation before jax is imported, in about a second).
"""
import os
import re
import subprocess
import sys

import pytest
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSQ, MOT = "--config=configs/fsq_shapes.py:smoke", "--config=configs/mot_shapes.py:smoke"
WD = "--workdir={wd}"

# name: (arguments, regex the error line must match); {wd}: a fresh workdir, {tmp}: a tmp dir.
CASES = {
    "negative_steps": ([FSQ, WD, "--config.tokenizer_train.steps=-3"],
                       r"config\.tokenizer_train\.steps=-3: must be a positive integer"),
    "zero_levels": ([FSQ, WD, "--config.fsq.levels=()"],
                    r"config\.fsq\.levels=\(\): needs at least one level"),
    "level_below_2": ([FSQ, WD, "--config.fsq.levels=(8,1)"],
                      r"config\.fsq\.levels=\(8, 1\):.*integer >= 2"),
    "unknown_field": ([FSQ, WD, "--config.fsq.nope=3"],
                      r"--config\.fsq\.nope: no such config field 'nope'"),
    "malformed_value": ([FSQ, WD, "--config.tokenizer_train.steps=abc"],
                        r"--config\.tokenizer_train\.steps=abc: invalid literal"),
    "negative_cpu_devices": ([FSQ, WD, "--config.mesh.cpu_devices=-2"],
                             r"config\.mesh\.cpu_devices=-2: must be an integer >= 0"),
    "zero_read_threads": ([FSQ, WD, "--config.data.read_threads=0"],
                          r"config\.data\.read_threads=0: must be a positive integer"),
    "negative_worker_count": ([FSQ, WD, "--config.data.worker_count=-1"],
                              r"config\.data\.worker_count=-1: must be >= 0"),
    "malloc_hugepages_not_bool": ([FSQ, WD, "--config.mesh.malloc_hugepages=3"],
                                  r"--config\.mesh\.malloc_hugepages=3: .*Non-boolean"),
    "unknown_size": (["--config=configs/fsq_shapes.py:huge", WD],
                     r"configs/fsq_shapes\.py: unknown size 'huge'; choose from"),
    "unknown_option": (["--config=configs/mot_shapes.py:smoke,bogus", WD],
                       r"unknown option\(s\) \['bogus'\]"),
    "unknown_fsq_option": (["--config=configs/fsq_shapes.py:demo,bgi", WD],
                           r"configs/fsq_shapes\.py: unknown option\(s\) \['bgi'\]; choose from"),
    "missing_config_file": (["--config=configs/nope.py:smoke", WD],
                            r"--config: no such config file 'configs/nope\.py'"),
    "missing_config_flag": ([WD], r"--config is required"),
    "missing_workdir": ([FSQ], r"--workdir is required"),
    "unknown_mode": ([FSQ, WD, "--mode=bogus"], r"--mode=bogus: value should be one of"),
    "stray_argument": ([FSQ, WD, "extra"], r"unexpected arguments: extra"),
    "not_a_main_config": (["--config=configs/sweep_scaling.py:micro", WD],
                          r"config has no data or mesh block"),
    "odd_head_dim": ([MOT, WD, "--config.model.num_heads=3"],
                     r"config\.model\.num_heads=3: must divide model\.d_model"),
    "image_size_vs_downsampling": ([FSQ, WD, "--config.data.image_size=34"],
                                   r"config\.data\.image_size=34: must be divisible by the FSQ "
                                   r"downsampling factor"),
    "model_mode_tokenizer_config": ([FSQ, WD, "--mode=model"],
                                    r"--mode=model needs a config with a `model` block"),
    "unknown_dataset": ([FSQ, WD, "--mode=data", "--config.data.name=not_a_dataset",
                         "--config.data.data_dir={tmp}/tfds"],
                        r"TFDS dataset 'not_a_dataset' is not known.*\(data_dir \S+/tfds\)"),
    "workdir_under_a_file": ([FSQ, "--workdir={tmp}/a_file/sub", "--mode=data"],
                             r"Not a directory: '\S+/a_file/sub"),
    "tokenize_before_tokenizer": ([MOT, WD, "--mode=tokenize"],
                                  r"no checkpoint directory at \S+/tokenizer/checkpoints"),
    "model_before_tokenize": ([MOT, WD, "--mode=model"],
                              r"no image tokens for split 'train' in \S+/image_tokens; run "
                              r"--mode=tokenize"),
    "sample_before_training": ([MOT, WD, "--mode=sample"],
                               r"no checkpoint directory at \S+/model/checkpoints"),
}


def _run(name, tmp):
    args, _ = CASES[name]
    wd = os.path.join(tmp, name)
    args = [a.format(wd=wd, tmp=tmp) for a in args]
    env = child_env(drop_prefixes=("MMJAX_TRACEBACK",))
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "mmjax.main", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_with_exit_code_2(tmp_path, name):
    open(tmp_path / "a_file", "w").close()
    res = _run(name, str(tmp_path))
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("mmjax: error:")]
    assert len(errors) == 1, output[-3000:]
    assert re.search(CASES[name][1], errors[0]), errors[0]
    assert res.returncode == 2, output[-3000:]


def test_a_crash_still_shows_its_traceback(tmp_path):
    """Only expected errors are shortened: a bug (here: an unknown attribute inside mmjax while
    no --config override is involved) must keep its traceback."""
    code = ("import sys; from mmjax import main, stages\n"
            "def boom(config, workdir, mode): raise KeyError('bug')\n"
            "stages.run_mode = boom\n"
            f"sys.argv = ['mmjax', '{FSQ}', '--workdir={tmp_path}']\n"
            "main.entry()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError: 'bug'" in res.stderr


def test_console_script_and_help_print_the_examples():
    """`mmjax` is `python -m mmjax.main`; --help shows the examples, one per line."""
    for cmd in ([sys.executable, "-m", "mmjax.main", "--help"],
                [os.path.join(os.path.dirname(sys.executable), "mmjax"), "--help"]):
        if not os.path.exists(cmd[0]):
            pytest.skip("the mmjax console script is not installed (pip install -e .)")
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert "  mmjax --config=configs/mot_shapes.py:demo --workdir=/tmp/mmjax_demo" in lines
        assert any(line.strip().startswith("--workdir:") for line in lines)
