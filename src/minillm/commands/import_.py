"""`minillm import`: start from a model someone else trained: `hf` turns a local transformers
checkpoint directory (minillm.interop.hf_dir), `gguf` a llama.cpp file (minillm.interop.gguf), into a
run directory that every command reads."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "import", help="turn a Hugging Face model directory or a GGUF file into a run directory",
        description="Convert another tool's model into a minillm run directory (config.json, "
                    "model.safetensors, tokenizer.json) for sample, chat, eval, finetune and the JAX "
                    "backend.",
        epilog="examples: minillm import hf --model ~/models/tiny-llama --out runs/tiny-llama\n"
               "          minillm import gguf --file model.gguf --out runs/from-gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = formats.add_parser(
        "hf", help="a local transformers directory (GPT-2, LLaMA, Mistral, Qwen2)",
        description="Read config.json, safetensors weights and a byte-level BPE tokenizer.json of a GPT-2, "
                    "LLaMA, Mistral (no sliding window) or Qwen2 checkpoint. Anything minillm cannot express "
                    "is an error naming it, and nothing is written.")
    hf.add_argument("--model", required=True, metavar="HFDIR", help="the transformers checkpoint directory")
    hf.add_argument("--out", required=True, metavar="RUN", help="the run directory to write (must not exist)")
    hf.set_defaults(func=run_hf)
    gg = formats.add_parser(
        "gguf", help="a llama.cpp GGUF file (llama / gpt2 architecture)",
        description="Read a GGUF file of llama.cpp's 'llama' or 'gpt2' architecture (f32, f16, bf16 or "
                    "q8_0 tensors) whose byte-level BPE tokenizer minillm reproduces, e.g. one from "
                    "`minillm export gguf`. Anything else is an error naming it, and nothing is written.")
    gg.add_argument("--file", required=True, metavar="FILE.gguf", help="the GGUF file")
    gg.add_argument("--out", required=True, metavar="RUN", help="the run directory to write (must not exist)")
    gg.set_defaults(func=run_gguf)


def run_hf(args: argparse.Namespace) -> int:
    from transformers.utils import logging

    from minillm.interop.hf_dir import import_hf

    logging.disable_progress_bar()  # one line of result, not transformers' loading bars
    out = import_hf(args.model, args.out)
    print(f"run directory written to {out}")
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from minillm.interop.gguf import import_gguf

    print(f"run directory written to {import_gguf(args.file, args.out)}")
    return 0
