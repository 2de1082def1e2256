"""The matrix products of the packed decoder, and which one this machine runs fastest.

A decode step at batch 1 is matrix-vector products: its speed is how fast the weights stream
from memory. Two ways to write them, each with its own weight layout:
- `addmm_linear`, weights [in, out]: the BLAS (MKL's `sgemv` / `sgemm`), eager or as an extern
  call inside a compiled graph.
- `row_dot_linear`, weights [out, in]: under torch.compile each single-row product is written as
  a row-wise dot product, `(x[:, None, :] * w).sum(-1)`, which Inductor compiles into one
  vectorised reduction over contiguous rows.
Which streams faster depends on the CPU (BENCHMARKS.md, "Inference"): on an AMD EPYC (Zen 4) the
row dots read at ~40 GB/s, 3x MKL's `sgemv`; on an Intel Xeon (AMX) MKL reads at ~30-50 GB/s.
So the compiled decoder measures it once per process (`row_dots_faster`).

Row dots in blocks (`in_row_blocks`): one row's dot product is a chain of vector additions, each
waiting for the last (~4 cycles), so a single accumulator caps how fast a core consumes a row:
at 16 int8 weights per addition, ~10 GB/s on this Xeon, well under what memory delivers. Split
the output rows into 8 equal blocks and Inductor fuses the 8 reductions of the same shape into one
loop with 8 independent accumulators: the int8 products of gpt2-small's blocks 9.2 -> 5.8 ms,
fp32 row dots 15.9 -> 10.1 ms (MKL: 11.2 ms), each product's input depending on the last.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

ROW_DOT_ENV = "MINILLM_ROW_DOT"  # "1" / "0" force the choice (tests, or a machine already measured)
ROW_BLOCKS = 8  # independent accumulators per fused row-dot loop


def in_row_blocks(dot: Callable[[int, int], torch.Tensor], n_out: int,
                  blocks: int = ROW_BLOCKS) -> torch.Tensor:
    """dot(a, b) -> (1, b - a): the row dots of output rows a..b-1. Returns (1, n_out), computed as
    `blocks` equal blocks of rows (which Inductor fuses into one loop, one accumulator each) and
    the remainder, so every row's own sum is exactly the unblocked one."""
    n = n_out // blocks
    if n == 0:
        return dot(0, n_out)
    parts = [dot(j * n, (j + 1) * n) for j in range(blocks)]
    if n * blocks < n_out:
        parts.append(dot(n * blocks, n_out))
    return torch.cat(parts, dim=-1)


def addmm_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """BLAS layout: x (N, in) times w (in, out) -> (N, out)."""
    if not isinstance(w, torch.Tensor):  # int8 / int4 weights (minillm.torch.quantize): their own products
        return w.linear(x, b)
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


def row_dot_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Row-dot layout: x (N, in) times w (out, in) -> (N, out)."""
    if not isinstance(w, torch.Tensor):  # int8 / int4 layers: dequantized inside their own row dots
        return w.linear(x, b)
    if x.size(0) == 1 and torch.compiler.is_compiling():
        # One token: y[o] = sum_i w[o, i] x[i], written out so Inductor emits reduction loops over
        # contiguous rows of w (no (1, out, in) temporary is ever materialised), in row blocks.
        y = in_row_blocks(lambda a, b: (x[:, None, :] * w[a:b]).sum(-1), w.size(0))  # (1, out)
        return y if b is None else y + b
    return F.linear(x, w, b)


def _row_dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return row_dot_linear(x, w, None)


@functools.cache
def row_dots_faster(rows: int = 4096, cols: int = 4096, rounds: int = 5) -> bool:
    """Whether compiled row dots stream a single-row product faster than the BLAS here: both read
    a rows x cols float32 matrix (64 MiB, past most L3 caches) 10 times a round, in turn; medians
    of `rounds`. About a second plus one small compile; once per process. MINILLM_ROW_DOT=1 / 0
    skips the measurement."""
    forced = os.environ.get(ROW_DOT_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    w = torch.randn(rows, cols)  # (out, in)
    w_t = w.t().contiguous()  # (in, out)
    x = torch.randn(1, cols)
    row_dot = torch.compile(_row_dot, fullgraph=True)
    runs = {"row dots": lambda: row_dot(x, w), "blas": lambda: torch.mm(x, w_t)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():  # compile, touch the pages
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    run()
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["row dots"]) < statistics.median(times["blas"])
