"""The tutorials (docs/tutorials/NN-name.py, jupytext percent scripts): each is a valid notebook with
text cells, written as jupytext writes it, and runs as a plain script (its asserts check the hand-built
piece against the library) within the time limit; they are numbered 01, 02, ... without gaps, and
docs/tutorials/README.md lists every one.

They share one work directory, in order, so 06-08 reuse the models 05 and 07 train (run alone, a
tutorial first runs the one it needs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
FILES = sorted(TUTORIALS.glob("[0-9]*.py"))
LIMIT_S = 120  # each tutorial, on 2 shared CPU cores


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tutorials")


def test_numbering_and_readme() -> None:
    names = [p.name for p in FILES]
    assert names and all(re.fullmatch(r"\d\d-[a-z0-9]+(-[a-z0-9]+)*\.py", n) for n in names), names
    assert [int(n[:2]) for n in names] == list(range(1, len(names) + 1)), f"numbering has a gap: {names}"
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"\]\((\d\d-[^)]+\.py)\)", readme)
    assert listed == names, f"README.md lists {listed}, the folder holds {names}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_tutorial(path: Path, work_dir: Path) -> None:
    notebook = jupytext.read(path)
    nbformat.validate(notebook)
    assert notebook.metadata["jupytext"]["text_representation"]["format_name"] == "percent"
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and notebook.cells[0].source.startswith(f"# {path.name[:2]} "), \
        f"{path.name}: the first cell should be a markdown title '# {path.name[:2]} · ...'"
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert re.search(r"^\s*assert ", code, re.M), f"{path.name} checks nothing against the library"
    # What `jupytext --to py:percent` writes back from the notebook: syncing an edited notebook
    # changes only what was edited.
    assert jupytext.writes(notebook, fmt="py:percent") == path.read_text(encoding="utf-8")

    env = {**os.environ, "MINILLM_TUTORIAL_DIR": str(work_dir), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name} ran past {LIMIT_S} s")
    wall = time.perf_counter() - start
    print(f"{path.name}: {wall:.1f} s")
    assert result.returncode == 0, f"{path.name} failed after {wall:.0f} s:\n{result.stderr[-3000:]}"
