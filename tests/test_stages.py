"""Stage orchestration: a preempted training stage stops the pipeline (no eval on a half-trained
stage) and the CLI reports it in one line with exit code 143."""
import ml_collections
import pytest

from mmjax import stages, train


def test_preempted_training_stops_the_pipeline(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "train", lambda *a, **k: {"step": 7, "preempted": True})
    monkeypatch.setattr(stages.model, "build_task", lambda *a: None)
    monkeypatch.setattr(stages.tokenizer, "TokenizerTask", lambda *a: None)
    later = []
    monkeypatch.setattr(stages.tokenize, "run", lambda *a: later.append("tokenize"))
    config = ml_collections.ConfigDict({"train": {"eval_every": 0}})
    with pytest.raises(train.Preempted, match="step 7"):
        stages.model.run(config, None)
    with pytest.raises(train.Preempted, match="tokenizer training stopped at step 7"):
        stages.tokenizer.run(None, type("W", (), {"data_dir": None})())
    assert not later


def test_plan_names_every_stage_in_order():
    assert stages.plan("pipeline", True) == ["data", "tokenizer", "tokenize", "model", "sample"]
    assert stages.plan("pipeline", False) == ["data", "tokenizer"]
    assert stages.plan("eval", True) == ["sample"]
    with pytest.raises(ValueError, match="--mode=model needs a config with a `model` block"):
        stages.plan("model", False)


def test_cli_exit_code_for_preemption(monkeypatch, capsys):
    from mmjax import main as cli

    def preempted(*args, **kwargs):
        raise train.Preempted("model training stopped at step 3 (SIGTERM)")

    monkeypatch.setattr(cli.app, "run", preempted)
    with pytest.raises(SystemExit) as exit_info:
        cli.entry()
    assert exit_info.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmjax: error: model training stopped at step 3 (SIGTERM)"]
