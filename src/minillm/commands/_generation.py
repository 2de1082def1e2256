"""What `minillm sample` and `minillm chat` share: the sampling options and loading a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from minillm.checkpoint import TOKENIZER_FILE
from minillm.tokenizer.stream import special_ids


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.8,
                      max_new_tokens: int = 200) -> None:
    """--run, the decoding options, --seed, --compile, --threads."""
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory (config.json, tokenizer.json, model.safetensors or a LoRA adapter)")
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter to merge into --run's weights (a `finetune --method lora` run "
                        "directory, or a peft adapter directory)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens to generate (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"softmax temperature; 0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens with mass >= p")
    p.add_argument("--min-p", type=float, help="drop tokens less likely than min_p x the most likely one")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in context")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable); eos always stops")
    p.add_argument("--seed", type=int, help="random seed (same seed, same output)")
    p.add_argument("--sliding-window", action="store_true",
                   help="past the context, condition on the last max_seq_len tokens (default: an error)")
    p.add_argument("--compile", action="store_true", help="torch.compile decoding (slow start, fast steps)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def load_for_generation(args: argparse.Namespace):
    """(model in eval mode, tokenizer) from --run; a clear error when the run has no tokenizer."""
    import torch

    from minillm.torch.sft import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.run, args.adapter)
    if tokenizer is None:
        raise ValueError(f"run directory {args.run} has no tokenizer.json; text generation needs one")
    return model, tokenizer


def load_draft(args: argparse.Namespace, model):
    """The --draft run's model for speculative decoding, once it is known to share --run's
    tokenizer (identical tokenizer.json files, same vocabulary size): else a one-line error."""
    from minillm.torch.sft import load_for_inference

    mine, theirs = Path(args.run) / TOKENIZER_FILE, Path(args.draft) / TOKENIZER_FILE
    if not theirs.is_file() or theirs.read_bytes() != mine.read_bytes():
        what = "differs from" if theirs.is_file() else "is missing, unlike"
        raise ValueError(f"--draft {args.draft}: its {TOKENIZER_FILE} {what} the one of --run {args.run}; "
                         f"the draft model must share the target's tokenizer")
    draft, _ = load_for_inference(args.draft)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--draft {args.draft}: vocab_size {draft.config.vocab_size} in its config.json, "
                         f"the target's is {model.config.vocab_size}; the vocabularies must be the same")
    return draft.eval()


def sampling_kwargs(args: argparse.Namespace, model, tokenizer) -> dict:
    """generate() keyword arguments from the command line options."""
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                  repetition_penalty=args.repetition_penalty, stop_strings=list(args.stop),
                  stop_token_ids=special_ids(tokenizer, "eos"),
                  context_overflow="slide" if args.sliding_window else "error", compile=args.compile)
    if tokenizer.vocab_size < model.config.vocab_size:  # a padded embedding table
        kwargs["vocab_size"] = tokenizer.vocab_size
    return kwargs
