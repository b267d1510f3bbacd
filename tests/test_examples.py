"""The example notebook runs end to end in the project's Python and reports real accuracies."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "qkd_keras_api.ipynb"
ROWS = ("Teacher (FP)", "Baseline (FP)", "Quantized (PTQ)", "SS", "SS+TS", "QKD (SS+CS+TS)")


def _kernel_for_this_python(tmp_path, monkeypatch):
    """A kernelspec running ipykernel in this interpreter (the venv), found via JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "tfqkd-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tfqkd test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return "tfqkd-test"


def _stream_text(cell):
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebook_executes_and_prints_the_table(tmp_path, monkeypatch):
    kernel = _kernel_for_this_python(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [_stream_text(cell) for cell in nb.cells if cell.cell_type == "code"]
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # The kernel is the interpreter running the tests (the venv), not some other python3.
    assert f"python: {sys.executable}\n" in outputs[0]

    table = next(text for text in outputs if text.startswith("Method"))
    values = {}
    for name in ROWS:
        match = re.search(rf"^{re.escape(name)}\s+(\d+\.\d+)%$", table, re.MULTILINE)
        assert match, f"row {name!r} missing from\n{table}"
        values[name] = float(match.group(1))
    # Real numbers well above chance (10%) for every stage, on the 1,000 held-out digits.
    for name, value in values.items():
        assert 80.0 < value <= 100.0, (name, value)
    # print_qstats ran on the 4-bit student and reported its quantized operations.
    assert "Number of operations in model" in outputs[-1]
