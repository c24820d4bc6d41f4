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
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    for method in ("LoRA", "QLoRA", "prefix tuning", "prompt tuning"):
        assert method in outputs
    assert any(
        "image/png" in o.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )


RL_NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "RL_example.ipynb")


@pytest.mark.slow
def test_rl_notebook_executes(tmp_path, monkeypatch):
    """examples/RL_example.ipynb at tiny budgets: the Q table, both learning curves, GRPO and
    the PPO vs GRPO table all come out."""
    monkeypatch.setenv("QLORA_FAST_CACHE", str(tmp_path))
    for name, value in (("EPISODES", "60"), ("PRETRAIN", "10"), ("SFT", "3"), ("STEPS", "2"), ("HELDOUT", "8")):
        monkeypatch.setenv(f"RL_NOTEBOOK_{name}", value)
    nb = nbformat.read(RL_NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    for expected in ("V(S_t, A_t) after Q-learning", "practice greedy accuracy", "| PPO (critic)", "| GRPO (group)"):
        assert expected in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
