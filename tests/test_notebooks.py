"""The notebooks run top to bottom in smoke mode (nbclient, python3 kernel) and show pictures."""
import os

import nbformat
from nbclient import NotebookClient

import pytest
from child_env import child_env

pytestmark = pytest.mark.slow  # end to end: `-m 'not slow'` skips it

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")


def _execute(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # One device in the kernel: smoke batch sizes are not divisible by conftest's 8 fake devices.
    monkeypatch.setenv("XLA_FLAGS", child_env()["XLA_FLAGS"])
    monkeypatch.delenv("MMJAX_SWEEP_DIR", raising=False)
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    nbformat.validate(nb)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error" or "Traceback" in o.get("text", "")]
    assert not errors, errors  # no cell may print an error, even one the kernel survived
    return nb


def _outputs(nb, kind):
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if kind == "png" and "image/png" in o.get("data", {}):
                out.append(o)
            elif kind == "text" and o.get("output_type") == "stream":
                out.append(o["text"])
    return out


def test_quickstart_trains_samples_and_shows_pictures(tmp_path, monkeypatch):
    nb = _execute("quickstart", tmp_path, monkeypatch)
    work = tmp_path / "work"
    assert (work / "model" / "train_metrics.jsonl").exists()
    assert (work / "samples" / "text_to_image.png").exists()
    text = "".join(_outputs(nb, "text"))
    assert "tokenizer/reconstructions_validation.png" in text
    assert "samples/text_to_image.png" in text
    assert "captions of those images:" in text  # the prompt cell ran through mmjax.load
    # reconstructions, samples (text->image, image->text), the prompt's images, the loss curve
    assert len(_outputs(nb, "png")) >= 4


def test_scaling_notebook_fits_committed_results(tmp_path, monkeypatch):
    nb = _execute("scaling", tmp_path, monkeypatch)
    text = "".join(_outputs(nb, "text"))
    assert "Chinchilla:" in text and "N_opt=" in text
    assert "errors: {}" in text
    assert (tmp_path / "work" / "loss_vs_flops_loss.png").exists()
    assert len(_outputs(nb, "png")) >= 5  # fit figures + the MoT-vs-dense figure
