"""Check the notebook pairs and execute every notebook headless, in order (CI: `make notebooks`).

    .venv/bin/python .ci/run_notebooks.py --smoke                 # all notebooks, smoke size (DREAMBOOTH_SMOKE=1)
    .venv/bin/python .ci/run_notebooks.py --smoke 03_sweeps       # one notebook
    .venv/bin/python .ci/run_notebooks.py --check-only            # pairing and clean-commit checks only
    .venv/bin/python .ci/run_notebooks.py -p MODEL='"/tmp/tiny"'  # inject parameters, papermill style

Each notebook runs with nbclient (kernel python3, cwd notebooks/) on an in-memory copy: the committed
.ipynb is never written. Executed copies go to runs/executed_notebooks/ for inspection.
Exit status 1 if a pair is out of sync or dirty, if any notebook raises, or if the run changed files of
the git checkout (`git status`): notebooks write under runs/ only.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from jupytext.config import load_jupytext_config
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TEXT_FORMAT = "py:percent"


def notebook_pairs(folder: Path = NOTEBOOKS) -> list[tuple[Path, Path]]:
    """(NN_name.ipynb, NN_name.py) for every numbered notebook or script, in order."""
    stems = sorted({p.stem for p in folder.glob("[0-9][0-9]_*") if p.suffix in (".ipynb", ".py")})
    return [(folder / f"{s}.ipynb", folder / f"{s}.py") for s in stems]


def pair_problems(ipynb: Path, script: Path) -> list[str]:
    """Why this pair cannot be committed as it is (empty list = fine)."""
    if not ipynb.is_file() or not script.is_file():
        missing = ipynb if not ipynb.is_file() else script
        return [f"{missing.name} is missing: run `jupytext --sync notebooks/{script.stem}.*` to create the pair"]
    problems = []
    nb = nbformat.read(ipynb, as_version=4)
    # The text form must be exactly what jupytext writes from the notebook (same config as the CLI).
    expected = jupytext.writes(jupytext.read(ipynb), fmt=TEXT_FORMAT, config=load_jupytext_config(str(ipynb)))
    if script.read_text(encoding="utf-8") != expected:
        problems.append(f"{script.name} and {ipynb.name} differ: run `jupytext --sync notebooks/{script.name}`")
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    if dirty:
        problems.append(f"{ipynb.name} has outputs or execution counts in cells {dirty}: commit it cleared")
    if "widgets" in nb.metadata:
        problems.append(f"{ipynb.name} stores widget state (metadata.widgets): remove it (GitHub shows 'Invalid Notebook')")
    return problems


def inject_parameters(nb: nbformat.NotebookNode, params: dict) -> None:
    """Papermill's convention: a cell tagged injected-parameters right after the one tagged parameters."""
    where = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if where is None:
        raise SystemExit("cannot inject parameters: the notebook has no cell tagged 'parameters'")
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def execute(ipynb: Path, timeout: int, params: dict, executed_dir: Path) -> None:
    """Run one notebook from notebooks/; raises on the first failing cell (or a timeout / dead kernel)."""
    nb = nbformat.read(ipynb, as_version=4)
    if params:
        inject_parameters(nb, params)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ipynb.parent)}})
    try:
        client.execute()
    finally:
        executed_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed_dir / ipynb.name)


def checkout_status() -> set[str] | None:
    """`git status --porcelain` of the checkout (None outside git): notebooks must write only under runs/."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.stdout.splitlines())


def parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"-p {text!r}: use NAME=VALUE (VALUE a Python literal, else a string)")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebooks to run (e.g. 02_train); default all, in order")
    ap.add_argument("--smoke", action="store_true", help="DREAMBOOTH_SMOKE=1: tiny sizes (CI)")
    ap.add_argument("--check-only", action="store_true", help="only check pairing and clean commits")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell (default 600; smoke runs 180)")
    ap.add_argument("-p", "--param", action="append", type=parse_param, default=[], help="NAME=VALUE parameter")
    ap.add_argument("--executed-dir", type=Path, default=ROOT / "runs" / "executed_notebooks")
    args = ap.parse_args(argv)

    pairs = notebook_pairs()
    if args.names:
        unknown = set(args.names) - {s.stem for _, s in pairs}
        if unknown:
            raise SystemExit(f"unknown notebooks {sorted(unknown)}; have {[s.stem for _, s in pairs]}")
        pairs = [p for p in pairs if p[1].stem in args.names]
    problems = [msg for ipynb, script in pairs for msg in pair_problems(ipynb, script)]
    for msg in problems:
        print(f"FAIL {msg}")
    if problems or args.check_only:
        print(f"{len(pairs)} notebook pairs checked, {len(problems)} problems")
        return 1 if problems else 0

    if args.smoke:
        os.environ["DREAMBOOTH_SMOKE"] = "1"  # the kernels inherit this environment
    timeout = args.timeout or (180 if args.smoke else 600)
    failed, start, status = [], time.time(), checkout_status()
    for ipynb, _ in pairs:
        began = time.time()
        try:
            try:
                execute(ipynb, timeout, dict(args.param), args.executed_dir)
            except CellTimeoutError as err:
                # On a loaded machine nbclient has waited out a whole timeout on an idle kernel (a lost reply:
                # py-spy showed both sides idle in their event loops): one more try with a fresh kernel; a cell
                # that is really too slow times out again and fails.
                print(f"RETRY {ipynb.name} after a cell timeout ({time.time() - began:.0f} s): {str(err)[:200]}", flush=True)
                execute(ipynb, timeout, dict(args.param), args.executed_dir)
            print(f"ok   {ipynb.name}  {time.time() - began:6.1f} s", flush=True)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
            failed.append(ipynb.name)
            print(f"FAIL {ipynb.name}  {time.time() - began:6.1f} s\n{err}", flush=True)
    total = time.time() - start
    changed = sorted(checkout_status() - status) if status is not None else []
    if changed:
        failed.append("the checkout")
        print("FAIL the notebooks changed files of the checkout (write under runs/ instead):\n  " + "\n  ".join(changed))
    print(f"{len(pairs) - len(failed)}/{len(pairs)} notebooks ran in {total:.1f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
