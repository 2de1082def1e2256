"""The docs site (docs/, mkdocs.yml): every page is in the nav, every code link names a function or
class that imports, every image exists (and a figure is one that minillm.viz.figures draws), and
`mkdocs build --strict` succeeds, failing on a broken code link. The links are parsed here with a
regex of this file's own, not with docs/hooks.py's, so a hook that skipped links would be caught."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))  # the site's pages; the build itself rejects any other page not in the nav
# [text](../src/minillm/torch/layers.py#apply_rope): any link into the source tree.
SOURCE_LINK = re.compile(r"\]\(((?:\.\./)+src/[^)#\s]*)(?:#([^)\s]*))?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
# Pages that teach a concept: each shows at least one figure and links at least one function.
CONCEPT_PAGES = [p for p in PAGES if p.name not in ("tutorials.md",)]


def _page_id(p: Path) -> str:
    return str(p.relative_to(DOCS))


def test_docs_exist():
    names = {_page_id(p) for p in PAGES}
    assert {"index.md", "tokens.md", "attention.md", "training.md", "scale-out.md", "tutorials.md"} <= names


def test_every_page_is_in_the_nav_once():
    yaml = pytest.importorskip("yaml")
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = [file for item in nav for file in item.values()]
    assert sorted(listed) == sorted(_page_id(p) for p in PAGES), "docs/*.md and mkdocs.yml's nav differ"
    assert listed[0] == "index.md"


def test_the_tutorials_page_lists_every_tutorial():
    """Each docs/tutorials/NN-*.py is linked from tutorials.md, and nothing else is."""
    linked = re.findall(r"\]\(tutorials/([^)\s]+)\)", (DOCS / "tutorials.md").read_text())
    assert sorted(linked) == sorted(p.name for p in (DOCS / "tutorials").glob("[0-9]*.py"))


def _code_links(page: Path) -> list[tuple[str, str]]:
    return SOURCE_LINK.findall(page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_code_links_name_a_function_or_class(page):
    """importlib + getattr: the file exists, the module imports, the symbol is a function or class."""
    for path, symbol in _code_links(page):
        target = (page.parent / path).resolve()
        assert target.is_file(), f"{_page_id(page)}: {path} is not a file"
        rel = target.relative_to(ROOT / "src").with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        obj = importlib.import_module(module)
        for part in symbol.split(".") if symbol else []:
            assert hasattr(obj, part), f"{_page_id(page)}: {module} has no {symbol}"
            obj = getattr(obj, part)
        if symbol:
            obj = obj.fget if isinstance(obj, property) else obj
            obj = obj.__func__ if inspect.ismethod(obj) else obj  # a classmethod
            assert inspect.isfunction(obj) or inspect.isclass(obj), f"{_page_id(page)}: {module}.{symbol}"


@pytest.mark.parametrize("page", CONCEPT_PAGES, ids=_page_id)
def test_concept_pages_link_code_and_show_a_figure(page):
    text = page.read_text()
    assert any(symbol for _, symbol in _code_links(page)), f"{_page_id(page)} links no function"
    assert any("images/figures/" in src for src in IMAGE.findall(text)), f"{_page_id(page)} shows no figure"


def test_images_exist_and_figures_are_drawn_by_the_script():
    from minillm.viz.figures import registry

    drawn = set(registry())
    missing, unknown = [], []
    for page in PAGES:
        for src in IMAGE.findall(page.read_text()):
            path = (page.parent / src).resolve()
            if not path.is_file():
                missing.append(f"{_page_id(page)}: {src}")
            if path.parent == (DOCS / "images" / "figures").resolve() and path.name not in drawn:
                unknown.append(f"{_page_id(page)}: {src}")
    assert not unknown, f"figures no module of minillm.viz.figures draws: {unknown}"
    assert not missing, f"images not found (run `python -m minillm.viz.figures`): {missing}"


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # Never -q: mkdocs then stops counting warnings, and --strict passes whatever they say.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install mkdocs)")
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    # A code link became a link to the generated page, which shows the function's source.
    html = (tmp_path / "site" / "positions" / "index.html").read_text()
    assert 'href="../code/minillm/torch/layers/#apply_rope"' in html
    code = (tmp_path / "site" / "code" / "minillm" / "torch" / "layers" / "index.html").read_text()
    assert 'id="apply_rope"' in code and "rotate_half" in code


@pytest.mark.parametrize("link, reason", [
    ("../src/minillm/torch/layers.py#apply_rope_typo", "has no attribute 'apply_rope_typo'"),
    ("../src/minillm/torch/layers.py#GELU_APPROXIMATE", "is not a function or class"),
    ("../src/minillm/torch/nowhere.py#f", "module minillm.torch.nowhere does not import"),
])
def test_a_broken_code_link_fails_the_build(tmp_path, link, reason):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install mkdocs)")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(f"# Page\n\nSee [it]({link}).\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"site_name: t\ndocs_dir: {docs}\nhooks:\n  - {DOCS / 'hooks.py'}\n"
                      "nav:\n  - index.md\n")
    result = _build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "docs/index.md: broken code link: " in result.stderr and reason in result.stderr, result.stderr
