"""Serving under load: `minillm serve` vs `transformers serve --continuous-batching`, same weights.

transformers' server runs its continuous-batching engine (the ContinuousBatchingManager behind
`model.generate_batch`, with paged attention). Both are real OpenAI-compatible servers, each started
as its own process on a free localhost port, side by side, taking turns at each concurrency;
one asyncio client (httpx) sends N streaming `/v1/completions` requests to each, keeping exactly
`c` requests in flight (a new one starts when one ends) for c in 1, 4, 16. Prompts are cut from the
validation split (varied lengths), temperature 0, a fixed max_tokens. Per request: time to first
token (first chunk with text), latency (the stream's end), output tokens (`usage` of the last
chunk, asked for with stream_options.include_usage). Per server and concurrency: requests/s,
output tokens/s, p50/p99 time to first token and latency, errors (a status other than 200, an
error event, a dropped stream). Goal (issue 16): output tokens/s at c=16 >= 4x c=1.

Models: gpt-char is runs/shakespeare-char-cpu when it exists, else the same recipe
(configs/shakespeare-char-cpu.toml) trained for a few hundred steps into runs/serve-bench/ (kept
for the next time); bpe is runs/shakespeare-bpe-base. transformers gets the same weights through
minillm.interop.hf.to_transformers and the same tokenizer (save_hf_tokenizer), exported once into
runs/serve-bench/. Both servers stop at <|eos|>, so at temperature 0 they produce the same tokens
(the "same text" column counts the c=1 answers that agree).

    .venv/bin/python benchmarks/serve_load.py              # 200 requests at c = 1, 4, 16, both models
    .venv/bin/python benchmarks/serve_load.py --quick      # a smoke run: 12 requests at c = 1, 4
    .venv/bin/python benchmarks/serve_load.py --models bpe --no-hf --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from _common import ROOT, machine

from minillm.checkpoint import load_run

CACHE = ROOT / "runs" / "serve-bench"
PROMPT_TOKENS = {"gpt-char": (8, 24), "bpe": (16, 64)}  # prompt length range per model (its tokens)
NEW_TOKENS = {"gpt-char": 32, "bpe": 64}  # gpt-char's context is 64 tokens


def gpt_char_run(steps: int) -> Path:
    """The project's char model: the demo run if it exists, else its recipe for `steps` steps."""
    if (ROOT / "runs/shakespeare-char-cpu/model.safetensors").exists():
        return ROOT / "runs/shakespeare-char-cpu"
    out = CACHE / "gpt-char"
    if not (out / "model.safetensors").exists():
        print(f"training {out} ({steps} steps of configs/shakespeare-char-cpu.toml) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "minillm.cli", "train", "--config",
                        "configs/shakespeare-char-cpu.toml", "--quiet", "--set", f"out_dir={out}",
                        "--set", f"max_steps={steps}", "--set", "eval_interval=0"], cwd=ROOT, check=True,
                       stdout=sys.stderr)  # stdout is the report's (--json)
    return out


def hf_export(run: Path, name: str) -> Path:
    """A transformers directory (weights + tokenizer) of `run`, rebuilt when the run is newer."""
    import torch

    from minillm.interop.hf import to_transformers
    from minillm.tokenizer.chat import save_hf_tokenizer

    out = CACHE / f"{name}-hf"
    if (out / "model.safetensors").exists() and \
            (out / "model.safetensors").stat().st_mtime > (run / "model.safetensors").stat().st_mtime:
        return out
    config, tokenizer, params = load_run(run)
    hf_model = to_transformers({k: torch.from_numpy(v) for k, v in params.items()}, config)
    hf_model.save_pretrained(out)
    save_hf_tokenizer(tokenizer, out)
    return out


def prompts(run: Path, name: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompts: slices of the run's validation tokens (no special tokens), decoded to text."""
    config, tokenizer, _ = load_run(run)
    data_dir = json.loads((run / "config.json").read_text())["train"]["data_dir"]
    meta = json.loads((ROOT / data_dir / "meta.json").read_text())
    val = np.memmap(ROOT / data_dir / "val.bin", dtype=meta["dtype"], mode="r")
    special, (lo, hi) = set(tokenizer.special_tokens.values()), PROMPT_TOKENS[name]
    rng, out = random.Random(seed), []
    while len(out) < n:
        start, length = rng.randrange(len(val) - hi), rng.randint(lo, hi)
        ids = val[start:start + length].tolist()
        if not special.intersection(ids):
            out.append(tokenizer.decode(ids))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port, up once GET /v1/models answers; stopped with SIGINT."""

    def __init__(self, kind: str, run: Path, hf_dir: Path | None, max_batch: int, threads: int | None,
                 log: Path):
        self.port, env = free_port(), dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if kind == "minillm":
            self.model = run.name
            cmd = [sys.executable, "-m", "minillm.cli", "serve", "--run", str(run), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queue", "256"]
        else:  # transformers' own server, model preloaded; its model id is the directory
            self.model = str(hf_dir)
            cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(hf_dir),
                   "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "error"]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{kind} server did not start; its log: {log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: {ttft, latency, tokens, text, error}."""
    body = dict(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
    start, ttft, text, tokens, error = time.perf_counter(), None, "", None, None
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return dict(error=f"{response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    error = str(chunk["error"])[:200]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        text += choice["text"]
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and tokens is None:
        error = "no usage in the stream"
    return dict(ttft=ttft, latency=time.perf_counter() - start, tokens=tokens, text=text, error=error)


async def load(server: Server, texts: list[str], concurrency: int,
               max_tokens: int) -> tuple[list[dict], float]:
    """Every prompt once, `concurrency` in flight at all times -> (results in prompt order, wall s)."""
    results: list[dict | None] = [None] * len(texts)
    queue = iter(range(len(texts)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            for i in queue:  # one shared iterator: each index is taken by exactly one worker
                results[i] = await one_request(client, server, texts[i], max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    ms = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
    ttfts, latencies = [r["ttft"] for r in ok if r["ttft"] is not None], [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return dict(requests=len(results), errors=len(results) - len(ok), wall_s=round(wall, 2),
                requests_per_s=round(len(ok) / wall, 2), output_tokens_per_s=round(tokens / wall, 1),
                ttft_p50_ms=ms(ttfts, 50), ttft_p99_ms=ms(ttfts, 99), latency_p50_ms=ms(latencies, 50),
                latency_p99_ms=ms(latencies, 99),
                first_errors=sorted({r["error"] for r in results if r["error"]})[:3])


def bench_model(name: str, run: Path, hf_dir: Path | None, texts: list[str], args) -> tuple[list, str | None]:
    """Rows of both servers at every concurrency, and how many c=1 answers agree. Both servers run
    side by side (an idle one waits on its queue) and take turns at each concurrency, so a busy
    machine slows them alike."""
    kinds = ["minillm"] + ([] if hf_dir is None else ["transformers"])
    servers: dict[str, Server] = {}
    rows, texts_at_lo, max_tokens, top = [], {}, args.max_tokens or NEW_TOKENS[name], max(args.concurrency)
    try:
        for kind in kinds:
            servers[kind] = Server(kind, run, hf_dir, top, args.threads, CACHE / f"{name}-{kind}.log")
            asyncio.run(load(servers[kind], texts[:top], top, max_tokens))  # warm-up: connections, batches
        for c in args.concurrency:
            for kind in kinds:
                results, wall = asyncio.run(load(servers[kind], texts, c, max_tokens))
                rows.append(dict(model=name, server=kind, concurrency=c, **summarize(results, wall)))
                texts_at_lo.setdefault(kind, [r["text"] if r["error"] is None else None for r in results])
                print(f"{name} {kind} c={c}: {rows[-1]['output_tokens_per_s']} out tok/s, "
                      f"{rows[-1]['errors']} errors", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    if hf_dir is None:
        return rows, None
    agree = sum(a is not None and a == b for a, b in zip(texts_at_lo["minillm"], texts_at_lo["transformers"]))
    return rows, f"{agree}/{len(texts)}"


def report(rows: list[dict], same: dict[str, str], args) -> None:
    print(f"machine: {machine(('torch', 'transformers', 'uvicorn'))}")
    print(f"{args.requests} streaming /v1/completions requests per row, temperature 0, max_tokens "
          + ", ".join(f"{m} {args.max_tokens or NEW_TOKENS[m]}" for m in args.models)
          + f"; minillm --max-batch {max(args.concurrency)}\n")
    print("| model | server | concurrency | req/s | output tok/s | TTFT p50 / p99 ms | latency p50 / p99 ms "
          "| errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['requests_per_s']:.2f} "
              f"| {r['output_tokens_per_s']:,.0f} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} "
              f"| {r['latency_p50_ms']} / {r['latency_p99_ms']} | {r['errors']} |")
    lo, hi = min(args.concurrency), max(args.concurrency)
    print()
    for model in args.models:
        tps = {(r["server"], r["concurrency"]): r["output_tokens_per_s"] for r in rows if r["model"] == model}
        scaling = ", ".join(f"{s} {tps[s, hi] / tps[s, lo]:.1f}x" for s in ("minillm", "transformers")
                            if (s, lo) in tps and tps[s, lo])
        line = f"{model}: output tok/s at c={hi} over c={lo}: {scaling}"
        if ("transformers", lo) in tps:
            line += "; minillm / transformers: " + ", ".join(
                f"c={c} {tps['minillm', c] / tps['transformers', c]:.2f}x" for c in args.concurrency
                if tps.get(("transformers", c)))
            line += f"; same text at c={lo}: {same[model]}"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PROMPT_TOKENS), choices=list(PROMPT_TOKENS))
    p.add_argument("--requests", type=int, default=200, help="requests per server and concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, help="new tokens per request (default: per model)")
    p.add_argument("--threads", type=int, help="torch threads of both servers (default: torch's choice)")
    p.add_argument("--char-steps", type=int, default=300, help="training steps of gpt-char when it is built")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' server")
    p.add_argument("--quick", action="store_true", help="smoke run: 12 requests at c = 1, 4, 8 new tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens = 12, [1, 4], args.max_tokens or 8
    CACHE.mkdir(parents=True, exist_ok=True)
    rows, same = [], {}
    for name in args.models:
        run = gpt_char_run(args.char_steps) if name == "gpt-char" else ROOT / "runs/shakespeare-bpe-base"
        texts = prompts(run, name, args.requests)
        hf_dir = None if args.no_hf else hf_export(run, name)
        model_rows, same[name] = bench_model(name, run, hf_dir, texts, args)
        rows += model_rows
    if args.json:
        print(json.dumps({"machine": machine(("torch", "transformers", "uvicorn")), "rows": rows,
                          "same_text": same, "args": vars(args)}))
    else:
        report(rows, same, args)


if __name__ == "__main__":
    main()
