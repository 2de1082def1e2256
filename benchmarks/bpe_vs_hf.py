"""BPE training time and encoding throughput: minillm's pure-Python BPE vs HF `tokenizers` (Rust).

    .venv/bin/python benchmarks/bpe_vs_hf.py [--runs 3] [--minbpe /path/to/minbpe-clone]

Corpus: the built-in Shakespeare corpus (42 plays, 5.06 MB), fetched on first use. Both
trainers get the same input: the list of documents (for "1 MB", the documents cut after their
first 2**20 characters), the same GPT-4 split regex, bytes as the initial alphabet, and the same
vocabulary size (6 special tokens included). Encoding uses *our* trained tokenizer exported to
HF, so both encode with identical merges (and produce identical ids, which is checked); each of
our runs starts with an empty chunk cache, so cache building is part of the time. Times are the
median of `--runs` runs after one warm-up run. minbpe (optional, a local clone of
karpathy/minbpe) is timed once, without warm-up, on the first 1 MB at vocab 1024 only: it needs
minutes per run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable

from minillm.data.sources import shakespeare_files
from minillm.tokenizer.base import SPECIAL_TOKENS
from minillm.tokenizer.bpe import GPT4_SPLIT_PATTERN, BPETokenizer

MB = 1 << 20


def median_time(fn: Callable[[], object], runs: int, warmup: int = 1) -> float:
    """Median wall time of `runs` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_chars(docs: list[str], n: int) -> list[str]:
    """The documents cut so that together they hold the first `n` characters."""
    out, left = [], n
    for doc in docs:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def hf_train(docs: list[str], vocab_size: int):
    """Train HF `tokenizers` BPE with our pipeline: GPT-4 split, byte-level alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(SPECIAL_TOKENS.values()),
    )  # fmt: skip
    tok.train_from_iterator(docs, trainer)
    return tok


def load_minbpe(path: str) -> type:
    """minbpe's RegexTokenizer from a local clone, without its package __init__ (needs tiktoken)."""
    package = types.ModuleType("minbpe")
    package.__path__ = [str(Path(path) / "minbpe")]
    sys.modules["minbpe"] = package
    return importlib.import_module("minbpe.regex").RegexTokenizer


def bench_training(docs: list[str], runs: int) -> list[tuple[str, int, float, float]]:
    rows = []
    for label, subset in (("first 1 MB", first_chars(docs, MB)), ("full 5.06 MB", docs)):
        for vocab_size in (1024, 4096):
            ours = median_time(lambda: BPETokenizer().train(subset, vocab_size), runs)
            hf = median_time(lambda: hf_train(subset, vocab_size), runs)
            rows.append((label, vocab_size, ours, hf))
            print(f"train {label} vocab {vocab_size}: ours {ours:.2f}s, HF {hf:.2f}s, ratio {ours / hf:.1f}x",
                  flush=True)
    return rows


def bench_encoding(docs: list[str], runs: int) -> list[tuple[str, float, float, float]]:
    from tokenizers import Tokenizer

    text = "".join(docs)
    ours = BPETokenizer().train(first_chars(docs, MB), 1024)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_hf(Path(tmp) / "tokenizer.json")
        hf = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    rows = []
    for label, sample in (("first 1 MB", text[:MB]), ("full 5.06 MB", text)):
        assert ours.encode(sample) == hf.encode(sample).ids, "exported tokenizer disagrees"

        def encode_cold() -> None:
            ours._cache.clear()  # measure cache building too
            ours.encode(sample)

        t_ours = median_time(encode_cold, runs)
        t_hf = median_time(lambda: hf.encode(sample), runs)
        # HF's fast path: many strings at once, in parallel threads (here: 64 K-character pieces;
        # timing only, ids at the cuts may differ).
        pieces = [sample[i : i + 65536] for i in range(0, len(sample), 65536)]
        t_hf_batch = median_time(lambda: hf.encode_batch(pieces), runs)
        size = len(sample.encode("utf-8")) / 1e6
        rows.append((label, size, t_ours, t_hf, t_hf_batch))
        print(f"encode {label}: ours {t_ours:.2f}s ({size / t_ours:.2f} MB/s), HF {t_hf:.2f}s, "
              f"HF batch {t_hf_batch:.2f}s", flush=True)  # fmt: skip
    return rows


def bench_minbpe(path: str, docs: list[str]) -> tuple[float, float, float, float]:
    """minbpe on the first 1 MB at vocab 1024 (one run): train and encode, ours alongside."""
    regex_tokenizer = load_minbpe(path)
    text = "".join(first_chars(docs, MB))
    minbpe = regex_tokenizer()
    start = time.perf_counter()
    minbpe.train(text, 1024)
    t_train = time.perf_counter() - start
    start = time.perf_counter()
    minbpe.encode_ordinary(text)
    t_encode = time.perf_counter() - start
    ours = BPETokenizer()
    t_ours_train = median_time(lambda: ours.train(text, 1024 + len(SPECIAL_TOKENS)), 1)
    ours._cache.clear()
    t_ours_encode = median_time(lambda: ours.encode(text), 1, warmup=0)
    print(f"minbpe: train {t_train:.1f}s (ours {t_ours_train:.2f}s), "
          f"encode {t_encode:.2f}s (ours {t_ours_encode:.2f}s)")
    return t_train, t_encode, t_ours_train, t_ours_encode


def report(train_rows, encode_rows, minbpe_row, runs: int) -> str:
    import tokenizers

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; Python "
        f"{platform.python_version()}, tokenizers {tokenizers.__version__}; "
        f"median of {runs} runs after a warm-up.",
        "",
        "| training | vocab | minillm (s) | HF tokenizers (s) | minillm / HF |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {label} | {v} | {o:.2f} | {h:.2f} | {o / h:.1f}x |" for label, v, o, h in train_rows]
    lines += ["", "| encoding | MB | minillm (s) | minillm MB/s | HF, one string (s) | minillm / HF | "
              "HF encode_batch, 64 KB pieces (s) | minillm / HF batch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {mb:.2f} | {o:.2f} | {mb / o:.2f} | {h:.2f} | {o / h:.1f}x | "
              f"{b:.2f} | {o / b:.1f}x |" for label, mb, o, h, b in encode_rows]
    if minbpe_row:
        tt, te, ot, oe = minbpe_row
        lines += ["", "| minbpe RegexTokenizer, first 1 MB, vocab 1024 (1 run) | minbpe (s) | minillm (s) "
                      "| minbpe / minillm |",
                  "|---|---:|---:|---:|", f"| training | {tt:.1f} | {ot:.2f} | {tt / ot:.0f}x |",
                  f"| encoding | {te:.2f} | {oe:.2f} | {te / oe:.1f}x |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (after 1 warm-up)")
    parser.add_argument("--minbpe", help="path to a local clone of karpathy/minbpe (optional)")
    args = parser.parse_args()
    docs = [p.read_text(encoding="utf-8") for p in shakespeare_files()]
    train_rows = bench_training(docs, args.runs)
    encode_rows = bench_encoding(docs, args.runs)
    minbpe_row = bench_minbpe(args.minbpe, docs) if args.minbpe else None
    print()
    print(report(train_rows, encode_rows, minbpe_row, args.runs))


if __name__ == "__main__":
    main()
