"""The example notebooks run, top to bottom, on small settings (LORAKIT_NOTEBOOK_SMALL=1), and
match the script that writes them."""

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SRC = Path(__file__).resolve().parents[1] / "src"


def generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", EXAMPLES / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def execute(name: str, folder: Path, monkeypatch, **env: str):
    """Run the notebook in a fresh kernel of this Python, which finds this lorakit."""
    monkeypatch.setenv("LORAKIT_NOTEBOOK_SMALL", "1")
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()
    return notebook


def outputs(notebook) -> str:
    return "\n".join(
        output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def test_notebooks_are_what_the_script_writes(tmp_path):
    for written in generator().write_notebooks(tmp_path):
        stored = nbformat.read(EXAMPLES / written.name, as_version=4)
        fresh = nbformat.read(written, as_version=4)
        assert [c.source for c in stored.cells] == [c.source for c in fresh.cells], (
            f"examples/{written.name} is stale: run python examples/make_notebooks.py"
        )
        assert all(not c.get("outputs") for c in stored.cells)  # stored without outputs


@pytest.mark.slow
def test_lora_from_scratch_notebook_runs(tmp_path, monkeypatch):
    text = outputs(execute("lora_from_scratch.ipynb", tmp_path, monkeypatch))
    assert "B is zero: True" in text
    assert "outputs equal to the base's before training" in text
    assert "trainable" in text and "largest difference" in text


@pytest.mark.slow
def test_instruction_tuning_notebook_runs(tmp_path, monkeypatch, tiny_llama_dir):
    notebook = execute(
        "instruction_tuning_smollm2.ipynb", tmp_path, monkeypatch,
        LORAKIT_NOTEBOOK_MODEL=str(tiny_llama_dir),
    )  # fmt: skip
    text = outputs(notebook)
    assert '"test_perplexity"' in text and "summary.json" in text and "adapter" in text
