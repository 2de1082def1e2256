"""MkDocs hook (mkdocs.yml `hooks:`): the docs' links to the code, resolved and checked at build time.

A page points at the code with a relative link to the source file plus the symbol as the anchor:

    [apply_rope](../src/minillm/torch/layers.py#apply_rope)

On GitHub that link opens the file. In the site it becomes a link to a generated page,
code/minillm/torch/layers.md, that shows the symbol's source as it is in the code the site was
built from. A symbol that does not import (renamed, moved, misspelled) stops the build with the
page and the link, so a page can never point at code that is gone.
"""

from __future__ import annotations

import importlib
import inspect
import posixpath
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

# ](../src/minillm/torch/layers.py#apply_rope): the path from the page to the file, and the symbol.
CODE_LINK = re.compile(r"\]\((?P<path>(?:\.\./)+src/(?P<file>minillm/[\w/]+\.py))(?:#(?P<symbol>[\w.]+))?\)")
CODE_DIR = "code"  # where the generated source pages live in the site


def module_name(file: str) -> str:
    """minillm/torch/layers.py -> minillm.torch.layers (a package's __init__.py -> the package)."""
    parts = file[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, symbol: str | None):
    """The function or class `module.symbol` (a method as Class.method), or the module itself when
    symbol is None; LookupError with a one-line reason otherwise."""
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise LookupError(f"module {module} does not import: {e}") from e
    for part in symbol.split(".") if symbol else []:
        if not hasattr(obj, part):
            raise LookupError(f"{getattr(obj, '__name__', obj)} has no attribute {part!r}")
        obj = getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    if inspect.ismethod(obj):  # a classmethod, bound to its class
        obj = obj.__func__
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if symbol and not (inspect.isfunction(obj) or inspect.isclass(obj)):
        raise LookupError(f"{module}.{symbol} is not a function or class")
    return obj


def code_links(markdown: str, page_uri: str) -> list[tuple[str, str, str | None]]:
    """(link text as written, source file under src/, symbol or None) of every code link of a page at
    docs/page_uri; LookupError when the relative path does not lead from the page to src/."""
    links = []
    for m in CODE_LINK.finditer(markdown):
        target = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), m["path"]))
        if target != f"src/{m['file']}":
            raise LookupError(f"{m['path']} does not lead from docs/{page_uri} to src/{m['file']}")
        links.append((m.group(0)[2:-1], m["file"], m["symbol"]))
    return links


def source_page(file: str, symbols: set[str]) -> str:
    """The generated page of one source file: its docstring, then each linked function or class in
    the order of the file, under an anchor named after it. A linked method is shown in its class:
    the class's source is cut before each linked method, which gets its own anchor there."""
    module = module_name(file)
    methods: dict[str, set[str]] = {}
    for symbol in symbols:
        owner, _, method = symbol.rpartition(".")
        methods.setdefault(owner or method, set()).update([method] if owner else [])
    found = sorted((inspect.getsourcelines(resolve(module, name))[1], name) for name in methods)
    doc = inspect.getdoc(resolve(module, None)) or ""
    lines = [f"# `{module}`", "", f"From `src/{file}`, as it is in the code this site was built from.", "",
             doc.split("\n\n")[0], ""]
    for start, name in found:
        lines += [f'<h2 id="{name}"><code>{name}</code></h2>', "", f"Line {start}:", ""]
        source = inspect.getsourcelines(resolve(module, name))[0]
        cuts = sorted((inspect.getsourcelines(resolve(module, f"{name}.{m}"))[1] - start, m)
                      for m in methods[name])
        begin = 0
        for offset, method in cuts:
            lines += _code(source[begin:offset])
            lines += [f'<h3 id="{name}.{method}"><code>{name}.{method}</code></h3>', ""]
            begin = offset
        lines += _code(source[begin:])
    return "\n".join(lines)


def _code(source: list[str]) -> list[str]:
    """A fenced Python block of these source lines (a method keeps its indentation in the class)."""
    text = "".join(source).rstrip()
    return ["```python", text, "```", ""] if text.strip() else []


def on_files(files, config):
    """Check every code link of every page and add one generated page per linked source file."""
    wanted: dict[str, set[str]] = {}
    for f in files.documentation_pages():
        try:
            for text, file, symbol in code_links(f.content_string, f.src_uri):
                resolve(module_name(file), symbol)
                wanted.setdefault(file, set()).update([symbol] if symbol else [])
        except LookupError as e:
            raise PluginError(f"docs/{f.src_uri}: broken code link: {e}") from e
    for file, symbols in sorted(wanted.items()):
        uri = f"{CODE_DIR}/{file[: -len('.py')]}.md"
        files.append(File.generated(config, uri, content=source_page(file, symbols)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Code links -> links to the generated source pages (relative to this page)."""
    here = posixpath.dirname(page.file.src_uri)

    def to_site(m: re.Match) -> str:
        target = posixpath.relpath(f"{CODE_DIR}/{m['file'][: -len('.py')]}.md", here or ".")
        return f"]({target}{'#' + m['symbol'] if m['symbol'] else ''})"

    return CODE_LINK.sub(to_site, markdown)
