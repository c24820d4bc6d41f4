"""examples/PEFT_example.ipynb runs top to bottom (nbclient), so it never rots."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "PEFT_example.ipynb")


@pytest.mark.slow
def test_peft_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_CACHE", str(tmp_path))  # pretrain the notebook's tiny base here
    monkeypatch.setenv("PEFT_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("PEFT_NOTEBOOK_PRETRAIN", "10")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    for method in ("LoRA", "QLoRA", "prefix tuning", "prompt tuning"):
        assert method in outputs
    assert any("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
