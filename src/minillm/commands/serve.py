"""`minillm serve`: an OpenAI-compatible HTTP server with continuous batching (minillm.serve)."""

from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API (and a web chat page)",
        description="Serve run directories on /v1/completions and /v1/chat/completions (streaming or not), "
                    "/v1/models and /health, with a web chat page at /. Requests are batched together "
                    "(continuous batching: they join and leave the batch between decode steps).",
        epilog="example: minillm serve --run runs/sft --port 8000, then "
               "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-')")
    p.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR",
                   help="a run directory to serve (repeatable); its model id is NAME or the directory's name")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="a LoRA adapter (ours or peft's) merged into the run NAME (default: the only --run)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together, per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a batch row before requests get 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens prefilled per decode step, so long prompts do not stall streams")
    p.add_argument("--api-key", default=os.environ.get("MINILLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MINILLM_API_KEY, which "
                        "other users cannot see in the process list, unlike this option)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def parse_runs(specs: list[str]) -> dict[str, str]:
    """["NAME=DIR" or "DIR", ...] -> {model id: directory}; a repeated id is an error."""
    runs: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (os.path.basename(os.path.normpath(spec)), spec)
        if not name or not path:
            raise ValueError(f"--run {spec!r}: expected DIR or NAME=DIR")
        if name in runs:
            raise ValueError(f"--run {spec!r}: the model id {name!r} is already taken by {runs[name]}; "
                             f"name it with NAME=DIR")
        runs[name] = path
    return runs


def parse_adapters(specs: list[str], runs: dict[str, str]) -> dict[str, str]:
    """["NAME=DIR" or "DIR", ...] -> {model id: adapter directory}; DIR alone needs a single --run."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(runs) != 1:
                raise ValueError(f"--adapter {spec!r}: with several --run, name the model: NAME=DIR")
            name, path = next(iter(runs)), spec
        if name not in runs or name in adapters:
            raise ValueError(f"--adapter {spec!r}: {name!r} not a --run model id, or given twice")
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from minillm.serve.app import create_app
    from minillm.serve.server import serve

    runs = parse_runs(args.run)
    app = create_app(runs, max_batch=args.max_batch, api_key=args.api_key or None, max_queue=args.max_queue,
                     prefill_chunk=args.prefill_chunk, adapters=parse_adapters(args.adapter, runs))
    serve(app, args.host, args.port)
    return 0
