"""The lab notebook: committed without outputs, and executed top to bottom headless (nbclient) on real data."""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from ops.torchserve import free_port
from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "skin_cancer_detection_lab.ipynb"
EXECUTED_ARTIFACT = ROOT / "runs" / "artifacts" / "skin_cancer_detection_lab.executed.ipynb"
CELL_TIMEOUT_S = 150


def execute(monkeypatch: pytest.MonkeyPatch, url: str, run_dir: str) -> nbformat.NotebookNode:
    """Run the committed notebook in a fresh kernel, from notebooks/ as Jupyter would, pointed at ``url``."""
    # The kernel inherits this process's environment; the notebook's parameter cell reads it.
    monkeypatch.setenv("SKIN_LESION_URL", url)
    monkeypatch.setenv("SKIN_LESION_RUN_DIR", run_dir)
    monkeypatch.setenv("SKIN_LESION_EVAL_SET", "samples")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


def text_of(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def test_committed_notebook_is_valid_and_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    source = "\n".join(cell.source for cell in code)
    # The project's own modules, not copies of their code: the installed packages, never scripts or a sys.path edit.
    for module in ("handler.checkpoint", "handler.inference", "lab.evaluation", "ops.client", "ops.paths"):
        assert f"from {module} import" in source
    assert "sys.path" not in source and "scripts" not in source and "demo." not in source


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(240)
def test_notebook_runs_top_to_bottom_against_real_torchserve(torchserve, samples_dir, monkeypatch, released_version):
    url = torchserve.url("inference")
    notebook = execute(monkeypatch, url, str(torchserve.run_dir))
    EXECUTED_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, EXECUTED_ARTIFACT)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not [output for cell in code for output in cell.outputs if output.output_type == "error"]
    figures = [output for cell in code for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(figures) >= 3  # Grad-CAM grid, evaluation figures, served Grad-CAM
    printed = "\n".join(text_of(cell) for cell in code)
    assert f"version     {released_version}" in printed and "images 70" in printed
    assert f"served by TorchServe at {url}, model version {released_version}" in printed
    difference = float(re.search(r"largest difference from the in-process handler: (\S+)", printed).group(1))
    assert difference < 1e-4
    assert "Grad-CAM of mel: 600x450 png" in printed


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(240)
def test_notebook_says_clearly_when_no_server_answers(samples_dir, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    notebook = execute(monkeypatch, url, str(tmp_path))
    printed = "\n".join(text_of(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert f"No TorchServe answers at {url}. Start it with `make serve`" in printed
