"""`minillm export`: hand a run to the rest of the ecosystem: `hf` writes a transformers model
directory (minillm.interop.hf_dir), `gguf` a llama.cpp file (minillm.interop.gguf)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run as a Hugging Face model directory or a llama.cpp GGUF file",
        description="Convert a run directory (any run `sample` loads: full, LoRA, aligned) into the "
                    "format another tool reads. Nothing is written when the architecture has no "
                    "equivalent there; the error names the field.",
        epilog="examples: minillm export hf --run runs/llama --out hf/llama\n"
               "          minillm export gguf --run runs/llama --out llama.gguf --dtype q8_0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = formats.add_parser(
        "hf", help="a transformers directory (config, safetensors, tokenizer, chat template)",
        description="Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and "
                    "generation_config.json, so that AutoModelForCausalLM and AutoTokenizer"
                    ".from_pretrained(HFDIR) load the model offline. GPT-2 style and LLaMA style runs.")
    hf.add_argument("--run", required=True, metavar="DIR", help="the run directory")
    hf.add_argument("--adapter", metavar="DIR", help="an adapter directory (ours or peft's) for a base run")
    hf.add_argument("--out", required=True, metavar="HFDIR", help="the directory to write (must not exist)")
    hf.add_argument("--adapter-mode", choices=("merged", "peft"), default="merged",
                    help="a LoRA run: merged into the weights (default), or the base model plus a peft "
                         "adapter in HFDIR/adapter (LLaMA style only)")
    hf.set_defaults(func=run_hf)
    gguf = formats.add_parser("gguf", help="a llama.cpp GGUF file",
                              description="Write one GGUF file that llama.cpp (and llama-cpp-python) loads.")
    gguf.add_argument("--run", required=True, metavar="DIR", help="the run directory")
    gguf.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write")
    gguf.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f32",
                      help="tensor type of the weight matrices (default: f32)")
    gguf.set_defaults(func=run_gguf)


def run_hf(args: argparse.Namespace) -> int:
    from transformers.utils import logging

    from minillm.interop.hf_dir import export_hf

    logging.disable_progress_bar()  # one line of result, not transformers' loading bars
    out = export_hf(args.run, args.out, args.adapter, args.adapter_mode)
    print(f"transformers model written to {out}")
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from minillm.interop.gguf import export_gguf

    export_gguf(args.run, args.out, args.dtype)
    print(f"GGUF file written to {args.out}")
    return 0
