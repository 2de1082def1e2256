"""Decode speed: minillm `generate` vs transformers `generate`, same weights, side by side.

Batch 1, fp32, greedy, a 16-token prompt and 128 new tokens (no early stop), random weights
converted with minillm.interop.hf.to_transformers. Every round times each variant once, in
turn, so a busy machine slows all of them alike; the table reports medians after a warm-up.
tokens/s = new tokens / wall time of the whole generate call (the 16-token prefill included).

For gpt2-small it also reports the memory-bandwidth bound: every decode step must read every
weight matrix once (the position table excepted), so tokens/s <= copy bandwidth / weight bytes.
Copy bandwidth is measured here, STREAM style: bytes read + bytes written per second while
copying a 1 GiB float32 tensor, three times in every round (it varies by 1.5x over minutes on
this shared VM), and each model's bound uses the median of its own rounds.

    .venv/bin/python benchmarks/generate_vs_hf.py                      # all three models
    .venv/bin/python benchmarks/generate_vs_hf.py --models gpt-char --runs 9 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from minillm.config import ModelConfig
from minillm.interop.hf import to_transformers
from minillm.torch.generate import generate
from minillm.torch.model import Transformer

# gpt-char with biases (transformers' GPT-2 always has them) and the 256-token context of the issue.
SHAPES = {"gpt-char": dict(max_seq_len=256, bias=True), "llama-tiny": {}, "gpt2-small": {}}


def copy_bandwidth(gib: float = 1.0, runs: int = 3) -> float:
    """GB/s of (read + write) bytes while copying a large float32 tensor; median of `runs`."""
    n = int(gib * 2**30) // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)  # touch the pages
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def hf_runner(hf_model, prompt: list[int], new_tokens: int):
    import transformers

    ids = torch.tensor([prompt])
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=0, eos_token_id=None,
                                           bos_token_id=None, use_cache=True)

    def run() -> list[int]:
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, len(prompt):].tolist()

    return run


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(name, **SHAPES[name])).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,)).tolist()
    variants = {"transformers": hf_runner(to_transformers(model), prompt, args.new_tokens),
                "minillm eager": lambda: generate(model, prompt, args.new_tokens, temperature=0)}
    compile_s = None
    if not args.no_compile:
        variants["minillm compiled"] = lambda: generate(model, prompt, args.new_tokens, temperature=0,
                                                        compile=True)
        t0 = time.perf_counter()
        variants["minillm compiled"]()  # compiles
        compile_s = time.perf_counter() - t0
    outputs = {k: run() for k, run in variants.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    bandwidth = []
    for _ in range(args.runs):
        bandwidth.append(copy_bandwidth())
        for k, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    tps = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    row = {"model": name, "params": model.num_parameters(), "tokens_per_s": tps,
           "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()},
           "same_tokens_as_hf": {k: outputs[k] == outputs["transformers"]
                                 for k in variants if k != "transformers"},
           "compile_s": compile_s, "bandwidth_gb_s": statistics.median(bandwidth),
           "weight_bytes_per_token": 4 * model.num_parameters(exclude_embeddings=True)}
    return row


def report(rows: list[dict], args) -> None:
    bandwidths = ", ".join(f"{r['model']} {r['bandwidth_gb_s']:.1f}" for r in rows)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; copy bandwidth (read + write, GB/s) {bandwidths}; "
          f"load average {os.getloadavg()[0]:.1f} at the end (other processes share these cores)")
    print(f"batch 1, fp32, greedy, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.runs} rounds\n")
    print("| model | params | transformers tok/s | minillm eager tok/s (x HF) "
          "| minillm compiled tok/s (x HF) | bandwidth bound tok/s | compiled % of bound | same tokens "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, hf = r["tokens_per_s"], r["tokens_per_s"]["transformers"]
        bound = r["bandwidth_gb_s"] * 1e9 / r["weight_bytes_per_token"]
        cells = [f"{t[k]:,.0f} ({t[k] / hf:.2f}x)" if k in t else "-"
                 for k in ("minillm eager", "minillm compiled")]
        best = t.get("minillm compiled", t["minillm eager"])
        same = "yes" if all(r["same_tokens_as_hf"].values()) else str(r["same_tokens_as_hf"])
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] else "-"
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {hf:,.1f} | {cells[0]} | {cells[1]} "
              f"| {bound:,.0f} | {100 * best / bound:.0f}% | {same} | {compile_s} |")
    print("\n" + json.dumps({"rows": rows}, default=float))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--runs", type=int, default=5, help="timed rounds per model (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args))
        speeds = ", ".join(f"{k} {v:,.1f} tok/s" for k, v in rows[-1]["tokens_per_s"].items())
        print(f"{name}: {speeds}", flush=True)
    report(rows, args)


if __name__ == "__main__":
    main()
