"""The notebooks as committed: paired with their py:percent scripts, in sync, without outputs or widget
state, with a Colab badge, a papermill `parameters` cell and Colab-only code behind a Colab check.
Executing them is `.ci/run_notebooks.py --smoke` (make notebooks); these checks take about a second."""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ["01_data_prep", "02_train", "03_sweeps", "04_language_drift", "05_evaluate"]
BADGE = "https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/{}.ipynb"


def load_runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / ".ci" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = load_runner()
PAIRS = runner.notebook_pairs()


def test_the_five_notebooks_are_paired_in_order():
    assert [script.stem for _, script in PAIRS] == EXPECTED
    assert all(ipynb.is_file() and script.is_file() for ipynb, script in PAIRS)


@pytest.mark.parametrize("ipynb,script", PAIRS, ids=[s.stem for _, s in PAIRS])
def test_pair_is_in_sync_and_clean(ipynb, script):
    assert runner.pair_problems(ipynb, script) == []


def copy_pair(tmp_path: Path, stem: str = "02_train") -> tuple[Path, Path]:
    """A copy of one pair (and the jupytext config it is written with) to break on purpose."""
    shutil.copy(ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    (tmp_path / "notebooks").mkdir()
    ipynb, script = (tmp_path / "notebooks" / f"{stem}{ext}" for ext in (".ipynb", ".py"))
    shutil.copy(ROOT / "notebooks" / ipynb.name, ipynb)
    shutil.copy(ROOT / "notebooks" / script.name, script)
    assert runner.pair_problems(ipynb, script) == []
    return ipynb, script


def test_edit_to_one_side_only_is_caught(tmp_path):
    ipynb, script = copy_pair(tmp_path)
    text = script.read_text()
    edited = text.replace("SEED = 0 ", "SEED = 1 ", 1)
    assert edited != text, "the edit must change the script"
    script.write_text(edited)
    assert runner.pair_problems(ipynb, script) == [
        "02_train.py and 02_train.ipynb differ: run `jupytext --sync notebooks/02_train.py`"
    ]


def test_outputs_and_widget_state_are_caught(tmp_path):
    ipynb, script = copy_pair(tmp_path)
    nb = nbformat.read(ipynb, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    nb.cells[code[1]].outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    nb.cells[code[2]].execution_count = 3
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nbformat.write(nb, ipynb)
    problems = runner.pair_problems(ipynb, script)
    assert problems[-2:] == [
        f"02_train.ipynb has outputs or execution counts in cells {code[1:3]}: commit it cleared",
        "02_train.ipynb stores widget state (metadata.widgets): remove it (GitHub shows 'Invalid Notebook')",
    ]


def test_missing_half_of_a_pair_is_caught(tmp_path):
    ipynb, script = copy_pair(tmp_path)
    ipynb.unlink()
    assert runner.notebook_pairs(script.parent) == [(ipynb, script)]
    assert runner.pair_problems(ipynb, script) == [
        "02_train.ipynb is missing: run `jupytext --sync notebooks/02_train.*` to create the pair"
    ]


@pytest.mark.parametrize("ipynb", [p for p, _ in PAIRS], ids=[s.stem for _, s in PAIRS])
def test_badge_parameters_and_colab_guard(ipynb):
    nb = nbformat.read(ipynb, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and BADGE.format(ipynb.stem) in nb.cells[0].source
    assert nb.metadata.kernelspec.name == "python3"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert 'SMOKE = os.environ.get("DREAMBOOTH_SMOKE", "0") == "1"' in params[0].source
    # Papermill/Colab parameters are plain assignments of literals (the smoke switch aside).
    for stmt in ast.parse(params[0].source).body:
        assert isinstance(stmt, ast.Assign), ast.unparse(stmt)
        if stmt.targets[0].id != "SMOKE":
            ast.literal_eval(stmt.value)
    # Every google.colab import sits inside an `if` that tests for Colab, so it is skipped elsewhere.
    tree = ast.parse("\n".join(c.source for c in nb.cells if c.cell_type == "code"))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ("google.colab" in ast.unparse(node.test) or "IN_COLAB" in ast.unparse(node.test)):
            guarded |= {id(n) for n in ast.walk(node)}
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("google")]
    assert all(id(n) in guarded for n in imports)


def test_injected_parameters_follow_the_parameters_cell():
    nb = nbformat.read(ROOT / "notebooks" / "02_train.ipynb", as_version=4)
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    runner.inject_parameters(nb, {"MAX_TRAIN_STEPS": 3, "MODEL": "/tmp/m"})
    cell = nb.cells[where + 1]
    assert cell.metadata.tags == ["injected-parameters"]
    assert cell.source == "MAX_TRAIN_STEPS = 3\nMODEL = '/tmp/m'"
    assert runner.parse_param("SEEDS=[0, 1]") == ("SEEDS", [0, 1])
    assert runner.parse_param("MODEL=/tmp/x") == ("MODEL", "/tmp/x")


def test_a_notebook_run_that_changes_the_checkout_fails(tmp_path, monkeypatch, capsys):
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "figure.png").write_text("committed")
    subprocess.run(git + ["add", "figure.png"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "execute", lambda ipynb, *a: ipynb.stem == "02_train" and (tmp_path / "figure.png").write_text("new"))
    assert runner.main(["01_data_prep", "02_train"]) == 1
    out = capsys.readouterr().out
    assert "FAIL the notebooks changed files of the checkout" in out and "M figure.png" in out
    (tmp_path / "figure.png").write_text("committed")
    monkeypatch.setattr(runner, "execute", lambda *a: None)
    assert runner.main(["01_data_prep", "02_train"]) == 0
