"""`prepare`: text source -> tokenizer -> `train.bin` / `val.bin` token files + `meta.json`.

Output directory:
- `train.bin`, `val.bin`: the token ids as a flat array of `meta["dtype"]` (see `token_dtype`);
- `tokenizer.json`: the tokenizer (`minillm.tokenizer.load_tokenizer` reads it);
- `meta.json`: tokenizer settings, vocabulary size, dtype, token counts, the split rule and the
  source checksum. It is written last, so its presence means the directory is complete.

Split rule (deterministic, no randomness): the last `val_fraction` of **each document** goes to
validation, cut at the first line break after `(1 - val_fraction)` of the document's UTF-8 bytes
(a document with no line break there is all train). Every document contributes to both splits,
so validation covers every play and not just the last one. Each document part ends with the
`eos` id, so the model learns where documents end.

Both passes stream (the tokenizer trains from blocks of text, then each ~1 MB block is encoded
and appended), so memory stays flat. Every file is written under a temporary name and renamed
into place, so an interrupted run leaves no half-written file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from tqdm import tqdm

from minillm.data.loader import read_meta
from minillm.data.sources import Document, Source, get_source
from minillm.files import atomic_write_text
from minillm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

META_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_document(doc: Document, val_fraction: float) -> Iterator[tuple[str, str]]:
    """Yield (split, text) pieces of a document, "train" first then "val", per the split rule."""
    cut = doc.size - int(doc.size * val_fraction) if val_fraction > 0 else doc.size + 1
    offset = 0  # UTF-8 bytes seen so far
    in_val = False
    for block in doc.read_blocks():
        if in_val:
            yield "val", block
            continue
        data = block.encode("utf-8")
        if offset + len(data) <= cut:
            offset += len(data)
            yield "train", block
            continue
        newline = data.find(b"\n", max(cut - offset, 0))
        if newline < 0:  # no line break after the cut in this block: look in the next one
            offset += len(data)
            yield "train", block
            continue
        in_val = True
        yield "train", data[: newline + 1].decode("utf-8")
        yield "val", data[newline + 1 :].decode("utf-8")


def _tokenizer_settings(tokenizer: str | Tokenizer | os.PathLike, vocab_size: int | None,
                        pattern: str) -> dict[str, Any]:
    """What decides the tokenizer: part of the idempotency key in meta.json."""
    if isinstance(tokenizer, Tokenizer):
        blob = json.dumps(tokenizer.to_dict(), sort_keys=True).encode()
        return {"kind": "given", "sha256": hashlib.sha256(blob).hexdigest()}
    if tokenizer == "char":
        return {"kind": "char"}
    if tokenizer == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer='bpe' needs vocab_size (e.g. 4096)")
        return {"kind": "bpe", "vocab_size": vocab_size, "pattern": pattern}
    path = Path(tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer must be 'char', 'bpe' or a tokenizer file; not found: {path}")
    return {"kind": "file", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _build_tokenizer(tokenizer: Any, settings: dict[str, Any], source: Source) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if settings["kind"] == "char":
        return CharTokenizer().train(source.texts())
    if settings["kind"] == "bpe":
        return BPETokenizer(settings["pattern"]).train(source.texts(), settings["vocab_size"])
    return load_tokenizer(tokenizer)


def _is_up_to_date(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing meta.json if `out` already holds this exact preparation, else None."""
    try:
        meta = read_meta(out)
    except (OSError, ValueError):  # absent or unreadable: prepare again
        return None
    if meta.get("settings") != settings or not (out / "tokenizer.json").is_file():
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = out / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta[f"{split}_tokens"] * itemsize:
            return None
    return meta


def _write_tokens(tok: Tokenizer, source: Source, files: dict[str, BinaryIO], dtype: np.dtype,
                  val_fraction: float, progress: bool) -> dict[str, int]:  # fmt: skip
    """Encode every document into the split files; return token counts per split and documents."""
    counts = {"train": 0, "val": 0, "documents": 0}
    eos = tok.eos_id
    with tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
        for doc in source.documents():
            counts["documents"] += 1
            ended = {"train": False, "val": False}
            for split, text in split_document(doc, val_fraction):
                if not text:
                    continue
                ids = tok.encode(text)
                np.asarray(ids, dtype=dtype).tofile(files[split])
                counts[split] += len(ids)
                ended[split] = True
                bar.update(len(text.encode("utf-8")))
            for split in ("train", "val"):  # close each non-empty document part with eos
                if ended[split]:
                    np.asarray([eos], dtype=dtype).tofile(files[split])
                    counts[split] += 1
    return counts


def _write_splits(tok: Tokenizer, src: Source, out: Path, dtype: np.dtype, val_fraction: float,
                  progress: bool) -> dict[str, int]:  # fmt: skip
    """Write train.bin / val.bin via temporary files renamed into place; return the counts."""
    temp = {split: out / f".{split}.bin.tmp" for split in ("train", "val")}
    try:
        with open(temp["train"], "wb") as train_file, open(temp["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            counts = _write_tokens(tok, src, files, dtype, val_fraction, progress)
        if counts["train"] + counts["val"] == 0:
            raise ValueError(f"source {src.name!r} is empty: it has no text")
        for split, path in temp.items():
            os.replace(path, out / f"{split}.bin")
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)
    return counts


def prepare(source: str | Source, out_dir: str | os.PathLike,
            tokenizer: str | Tokenizer | os.PathLike = "char", vocab_size: int | None = None,
            pattern: str = "gpt4", val_fraction: float = 0.1, force: bool = False,
            progress: bool | None = None) -> dict[str, Any]:
    """Tokenize a text source into `out_dir` (train.bin, val.bin, tokenizer.json, meta.json).

    source: "shakespeare", a .txt/.jsonl file, directory or glob, "hf:<dataset>", or a `Source`.
    tokenizer: "char" or "bpe" (trained here on the whole source; "bpe" needs `vocab_size`,
        `pattern` is "gpt4", "gpt2" or a regex), a path to a tokenizer JSON file, or a `Tokenizer`.
    val_fraction: the tail of each document that goes to val.bin (see the module docstring).
    force: redo the work even if `out_dir` already holds the same preparation.
    progress: show a progress bar; default: only when stderr is a terminal.

    Returns the meta.json content. A second call with the same source content and settings
    finds meta.json up to date, says so and returns without touching any file.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    src = get_source(source)
    out = Path(out_dir)
    settings = {"version": META_VERSION, "source_checksum": src.checksum(),
                "tokenizer": _tokenizer_settings(tokenizer, vocab_size, pattern),
                "val_fraction": val_fraction}
    meta = None if force else _is_up_to_date(out, settings)
    if meta is not None:
        print(f"{out}: already prepared from {src.name} with these settings; nothing to do", file=sys.stderr)
        return meta
    tok = _build_tokenizer(tokenizer, settings["tokenizer"], src)
    if tok.vocab_size <= len(tok.special_tokens):
        raise ValueError(f"source {src.name!r} is empty: no text to build a tokenizer or token files from")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    dtype = token_dtype(tok.vocab_size)
    progress = sys.stderr.isatty() if progress is None else progress
    counts = _write_splits(tok, src, out, dtype, val_fraction, progress)
    tok.save(out / "tokenizer.json")
    meta = _meta(settings, src, tok, dtype, counts)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")  # last: the directory is complete
    print(f"{out}: {counts['train']:,} train + {counts['val']:,} val tokens "
          f"({dtype.name}, vocab {tok.vocab_size})", file=sys.stderr)
    return meta


def _meta(settings: dict[str, Any], src: Source, tok: Tokenizer, dtype: np.dtype,
          counts: dict[str, int]) -> dict[str, Any]:
    """The content of meta.json: what was prepared, how, and how many tokens came out."""
    val_fraction = settings["val_fraction"]
    return {
        "settings": settings, "source": src.name, "tokenizer": tok.type_name, "vocab_size": tok.vocab_size,
        "dtype": dtype.name, "train_tokens": counts["train"], "val_tokens": counts["val"],
        "documents": counts["documents"], "eos_id": tok.eos_id,
        "split": f"last {val_fraction:.0%} of each document (from the first line break after "
        f"{1 - val_fraction:.0%} of its UTF-8 bytes) is val; each document part ends with eos",
    }
