"""Stage orchestration: a preempted training stage stops the pipeline (no eval on a half-trained
stage) and the CLI reports it in one line with exit code 143."""
import pytest

from mmjax import stages, train


def test_preempted_training_stops_the_pipeline(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "train", lambda *a, **k: {"step": 7, "preempted": True})
    later = []
    monkeypatch.setattr(stages, "tokenize_images", lambda *a: later.append("tokenize"))
    with pytest.raises(train.Preempted, match="step 7"):
        stages.train_model(None, str(tmp_path))
    with pytest.raises(train.Preempted, match="tokenizer training stopped at step 7"):
        stages.train_tokenizer(None, str(tmp_path))
    assert not later


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
