"""prepare(): token files, deterministic split, idempotence, streaming, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minillm.data import prepare as prepare_module
from minillm.data import sources
from minillm.data.prepare import prepare, token_dtype
from minillm.tokenizer import load_tokenizer
from minillm.tokenizer.bpe import BPETokenizer

DOC_A = "".join(f"line {i} of the first document, with é and 🙂\n" for i in range(40))
DOC_B = "".join(f"second document line {i}\r\n" for i in range(25))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(DOC_A, encoding="utf-8")
    (tmp_path / "corpus" / "b.txt").write_bytes(DOC_B.encode("utf-8"))
    return tmp_path / "corpus"


def read_split(out, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def expected_split(doc: str) -> tuple[str, str]:
    """The documented rule, computed independently: val starts after the first \\n at or after 90%."""
    data = doc.encode("utf-8")
    newline = data.find(b"\n", len(data) - int(len(data) * 0.1))
    return data[: newline + 1].decode(), data[newline + 1 :].decode()


def test_char_prepare_writes_documented_split(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    meta = prepare(str(corpus), out, tokenizer="char")
    tok = load_tokenizer(out / "tokenizer.json")
    eos = tok.decode([tok.eos_id])
    (train_a, val_a), (train_b, val_b) = expected_split(DOC_A), expected_split(DOC_B)
    assert tok.decode(read_split(out, "train")) == train_a + eos + train_b + eos
    assert tok.decode(read_split(out, "val")) == val_a + eos + val_b + eos
    assert 0.05 < len(val_a) / len(DOC_A) < 0.15 and val_b.startswith("second document line")
    assert meta["dtype"] == "uint16" and meta["documents"] == 2 and meta["vocab_size"] == tok.vocab_size
    assert meta["train_tokens"] == len(read_split(out, "train")) and "10%" in meta["split"]


def test_second_run_does_nothing_and_a_change_redoes(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    prepare(str(corpus), out, tokenizer="bpe", vocab_size=300)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare(str(corpus), out, tokenizer="bpe", vocab_size=300)
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    (corpus / "a.txt").write_text(DOC_A + "one more line\n", encoding="utf-8")
    prepare(str(corpus), out, tokenizer="bpe", vocab_size=300)
    assert "nothing to do" not in capsys.readouterr().err
    prepare(str(corpus), out, tokenizer="bpe", vocab_size=310)  # other settings: redo too
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 310
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_bpe_prepare_with_a_given_tokenizer_file(corpus, tmp_path) -> None:
    tok = BPETokenizer().train(DOC_A, 400)
    tok.save(tmp_path / "tok.json")
    out = tmp_path / "out"
    meta = prepare(str(corpus), out, tokenizer=tmp_path / "tok.json")
    assert meta["settings"]["tokenizer"]["kind"] == "file" and meta["vocab_size"] == tok.vocab_size
    train = read_split(out, "train").tolist()
    assert train[: len(tok.encode(expected_split(DOC_A)[0]))] == tok.encode(expected_split(DOC_A)[0])


def test_output_does_not_depend_on_block_size(corpus, tmp_path, monkeypatch) -> None:
    prepare(str(corpus), tmp_path / "big", tokenizer="char")
    monkeypatch.setattr(sources, "BLOCK_BYTES", 64)  # stream in tiny blocks
    prepare(str(corpus), tmp_path / "small", tokenizer="char")
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "big", split), read_split(tmp_path / "small", split))


def test_uint32_when_vocab_exceeds_16_bits() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_missing_file_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist.txt"):
        prepare(str(tmp_path / "does-not-exist.txt"), tmp_path / "out")


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_empty_corpus_is_a_clear_error(tmp_path, tokenizer: str) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        prepare(str(tmp_path / "empty.txt"), tmp_path / "out", tokenizer=tokenizer, vocab_size=300)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bpe_needs_vocab_size(corpus, tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        prepare(str(corpus), tmp_path / "out", tokenizer="bpe")


def test_failed_write_leaves_no_finished_looking_output(corpus, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    prepare(str(corpus), out, tokenizer="char")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write_tokens", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), out, tokenizer="char", force=True)
    assert not (out / "meta.json").exists() and not list(out.glob(".*tmp"))


def test_shakespeare_char_twice(tmp_path, capsys) -> None:
    """The `make demo` path: the built-in corpus (cached by the sources tests), twice."""
    meta = prepare("shakespeare", tmp_path / "shakespeare-char", tokenizer="char")
    assert meta["documents"] == 42 and meta["train_tokens"] + meta["val_tokens"] == 5_057_198 + 2 * 42
    prepare("shakespeare", tmp_path / "shakespeare-char", tokenizer="char")
    assert "nothing to do" in capsys.readouterr().err


# VmHWM is this process's own peak RSS (ru_maxrss would include the parent's, inherited over exec).
PEAK_RSS = """
import sys
from minillm.data.prepare import prepare
options = dict(tokenizer="bpe", vocab_size=512) if sys.argv[3] == "bpe" else dict(tokenizer="char")
prepare(sys.argv[1], sys.argv[2], progress=False, **options)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])  # KiB
"""


def _peak_rss_mb(tmp_path, copies: int, tokenizer: str) -> float:
    """Peak RSS of a fresh process that prepares `copies` copies of one play."""
    import subprocess
    import sys

    play = sources.shakespeare_files()[0].read_text(encoding="utf-8")
    source, out = tmp_path / f"{copies}.txt", tmp_path / f"out{copies}"
    source.write_text(play * copies, encoding="utf-8")
    command = [sys.executable, "-c", PEAK_RSS, str(source), str(out), tokenizer]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    return int(result.stdout.split()[-1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from Linux /proc")
def test_memory_stays_flat_on_a_small_corpus(tmp_path) -> None:
    """The default suite's version of the slow test below: a character tokenizer (no BPE
    training) on ~1 MB and ~14 MB of text, so a pass that holds the whole text or all its ids
    (~14 MB of str, ~100 MB as a list of ints) shows far above the bound (it grows ~9 MB;
    reading the file whole grows it by 160 MB)."""
    small, large = _peak_rss_mb(tmp_path, 8, "char"), _peak_rss_mb(tmp_path, 100, "char")
    assert large < small + 25, f"peak RSS grew from {small:.0f} MB to {large:.0f} MB"


@pytest.mark.slow  # ~30 s; test_output_does_not_depend_on_block_size covers the streaming logic
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from Linux /proc")
def test_memory_stays_flat_as_the_corpus_grows(tmp_path) -> None:
    small, large = _peak_rss_mb(tmp_path, 20, "bpe"), _peak_rss_mb(tmp_path, 400, "bpe")  # ~3, ~56 MB
    print(f"peak RSS: {small:.0f} MB for 3 MB of text, {large:.0f} MB for 56 MB")
    assert large < small + 15, f"peak RSS grew from {small:.0f} MB to {large:.0f} MB"
