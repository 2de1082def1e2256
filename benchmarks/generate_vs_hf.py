"""Decode speed: minillm `generate` vs transformers `generate`, same weights, side by side.

fp32, greedy, 16-token prompts and 128 new tokens (no early stop), random weights converted
with minillm.interop.hf.to_transformers; batch 1 by default, or each --batch size (B different
prompts of one length, so no padding on either side). Every round times each variant once, in
turn, so a busy machine slows all of them alike; the table reports medians after a warm-up.
tokens/s = B x new tokens / wall time of the whole generate call (the prefill included).

The weight-streaming bound: every decode step must read every weight matrix once (the position
table excepted), so at batch 1 tokens/s <= reading speed / weight bytes per token. The reading
speed is that of a plain reduction (`torch.sum`) over a float32 buffer of the same size as the
weights, measured three times in every round (it varies by 1.5x over minutes on this shared VM);
each row's bound uses the median of its own rounds. (Earlier tables used copy bandwidth, bytes
read + written while copying 1 GiB, which is not what a decode step does.)

    .venv/bin/python benchmarks/generate_vs_hf.py                      # all three models, batch 1
    .venv/bin/python benchmarks/generate_vs_hf.py --batch 8 32 --no-bound
    .venv/bin/python benchmarks/generate_vs_hf.py --models gpt-char --runs 9 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import machine

from minillm.config import ModelConfig
from minillm.interop.hf import to_transformers
from minillm.torch.generate import generate
from minillm.torch.model import Transformer

# gpt-char with biases (transformers' GPT-2 always has them) and the 256-token context of the issue.
SHAPES = {"gpt-char": dict(max_seq_len=256, bias=True), "llama-tiny": {}, "gpt2-small": {}}


def reading_speed(n_bytes: int, runs: int = 3) -> float:
    """GB/s of a plain reduction over a float32 buffer of n_bytes: how fast this machine reads as
    many bytes as a decode step must (in cache for a tiny model, from DRAM for gpt2-small)."""
    buffer = torch.rand(n_bytes // 4)
    buffer.sum()  # touch the pages
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(times) / 1e9


def hf_runner(hf_model, prompts: list[list[int]], new_tokens: int):
    import transformers

    ids = torch.tensor(prompts)  # (B, P): prompts of one length, no padding
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=0, eos_token_id=None,
                                           bos_token_id=None, use_cache=True)

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[:, ids.size(1):].tolist()

    return run


def bench_model(name: str, batch: int, args) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(name, **SHAPES[name])).eval()
    prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len)).tolist()
    variants = {"transformers": hf_runner(to_transformers(model), prompts, args.new_tokens),
                "minillm eager": lambda: generate(model, prompts, args.new_tokens, temperature=0)}
    compile_s = None
    if not args.no_compile:
        variants["minillm compiled"] = lambda: generate(model, prompts, args.new_tokens, temperature=0,
                                                        compile=True)
        t0 = time.perf_counter()
        variants["minillm compiled"]()  # compiles
        compile_s = time.perf_counter() - t0
    outputs = {k: run() for k, run in variants.items()}  # warm-up
    weight_bytes = 4 * model.num_parameters(exclude_embeddings=True)  # read once per decode step
    times: dict[str, list[float]] = {k: [] for k in variants}
    reading = []
    for _ in range(args.runs):
        if batch == 1 and not args.no_bound:
            reading.append(reading_speed(weight_bytes))
        for k, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "params": model.num_parameters(), "tokens_per_s": tps,
            "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()},
            "same_tokens_as_hf": {k: outputs[k] == outputs["transformers"]
                                  for k in variants if k != "transformers"},
            "compile_s": compile_s, "weight_bytes_per_token": weight_bytes,
            "reading_gb_s": statistics.median(reading) if reading else None}


def report(rows: list[dict], args) -> None:
    print(f"\n{machine(('torch', 'transformers'))}; {torch.get_num_threads()} threads")
    print(f"fp32, greedy, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
          f"median of {args.runs} rounds\n")
    print("| model | params | batch | transformers tok/s | minillm eager tok/s (x HF) "
          "| minillm compiled tok/s (x HF) | reading GB/s | streaming bound tok/s | best % of bound "
          "| same tokens | compile s |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        t, hf = r["tokens_per_s"], r["tokens_per_s"]["transformers"]
        cells = [f"{t[k]:,.0f} ({t[k] / hf:.2f}x)" if k in t else "-"
                 for k in ("minillm eager", "minillm compiled")]
        best = max(v for k, v in t.items() if k != "transformers")
        if r["reading_gb_s"]:
            bound = r["reading_gb_s"] * 1e9 / r["weight_bytes_per_token"]
            bound_cells = f"{r['reading_gb_s']:.1f} | {bound:,.0f} | {100 * best / bound:.0f}%"
        else:
            bound_cells = "- | - | -"
        same = "yes" if all(r["same_tokens_as_hf"].values()) else str(r["same_tokens_as_hf"])
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] else "-"
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {hf:,.1f} | {cells[0]} "
              f"| {cells[1]} | {bound_cells} | {same} | {compile_s} |")
    print("\n" + json.dumps({"rows": rows}, default=float))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (default: 1)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds per model (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-bound", action="store_true", help="skip the reading-speed measurement")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for batch in args.batch:
            rows.append(bench_model(name, batch, args))
            speeds = ", ".join(f"{k} {v:,.1f} tok/s" for k, v in rows[-1]["tokens_per_s"].items())
            print(f"{name} batch {batch}: {speeds}", flush=True)
    report(rows, args)


if __name__ == "__main__":
    main()
