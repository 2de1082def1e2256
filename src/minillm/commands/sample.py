"""`minillm sample`: continue a prompt with a trained model."""

from __future__ import annotations

import argparse
import sys

from minillm.commands._generation import add_sampling_args, load_for_generation, sampling_kwargs
from minillm.tokenizer.stream import special_ids


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate text from a trained model",
        description="Continue a prompt with the model of a run directory (KV-cached decoding). "
                    "Sampling: temperature, top-k, top-p, min-p, repetition penalty; or beam search.",
        epilog='example: minillm sample --run runs/shakespeare-char --prompt "ROMEO:" '
               '--num-samples 3 --seed 1')
    p.add_argument("--prompt", default="", help="text to continue (default: start from the bos token)")
    p.add_argument("--prompt-file", help="read the prompt from this file instead")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: > 0 favours longer outputs")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (one sample at a time)")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="framework that runs the model")
    add_sampling_args(p)
    p.set_defaults(func=run)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from bos (a model needs at least one token)."""
    ids = tokenizer.encode(text) if text else []
    if not ids:
        ids = special_ids(tokenizer, "bos")
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no bos token; give --prompt")
    return ids


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1 or args.num_beams < 1:
        raise ValueError("--num-samples and --num-beams must be >= 1")
    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if args.backend == "jax":
        return _run_jax(args, text)
    model, tokenizer = load_for_generation(args)
    ids = prompt_ids(tokenizer, text)
    kwargs = sampling_kwargs(args, model, tokenizer)
    if args.stream or args.num_beams > 1:
        for i in range(args.num_samples):
            if i:
                print("---------------")
            sys.stdout.write(text)
            for piece in _one_sample(args, model, tokenizer, ids, kwargs, i):
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        return 0
    from minillm.torch.generate import generate

    # All samples as one batch; row i is seeded with seed + i (so --stream gives the same text).
    seeds = None if args.seed is None else [args.seed + i for i in range(args.num_samples)]
    outs = generate(model, [ids] * args.num_samples, args.max_new_tokens, seed=seeds, tokenizer=tokenizer,
                    **kwargs)
    print("\n---------------\n".join(text + _text(tokenizer, out, kwargs) for out in outs))
    return 0


def _run_jax(args: argparse.Namespace, text: str) -> int:
    """The same sampler in JAX (minillm.jax.generate): every option but --stream and --compile."""
    if args.stream or args.compile:
        raise ValueError("--backend jax has no --stream or --compile (its decode step is always jitted)")
    from minillm.jax.generate import sample_texts

    outs = sample_texts(args.run, text, args.num_samples, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                        length_penalty=args.length_penalty, seed=args.seed, stop_strings=args.stop,
                        context_overflow="slide" if args.sliding_window else "error")
    print("\n---------------\n".join(text + out for out in outs))
    return 0


def _one_sample(args, model, tokenizer, ids: list[int], kwargs: dict, i: int):
    """Text pieces of sample i: streamed as generated, or the beam search result at once."""
    from minillm.torch.generate import generate, stream_text

    if args.num_beams > 1:
        out = generate(model, ids, args.max_new_tokens, num_beams=args.num_beams,
                       length_penalty=args.length_penalty, stop_token_ids=kwargs["stop_token_ids"],
                       vocab_size=kwargs.get("vocab_size"))
        return [_text(tokenizer, out, kwargs)]
    seed = None if args.seed is None else args.seed + i
    return stream_text(model, tokenizer, ids, args.max_new_tokens, seed=seed, **kwargs)


def _text(tokenizer, ids: list[int], kwargs: dict) -> str:
    """Decoded continuation without its stop token, cut before the first stop string."""
    if ids and ids[-1] in kwargs["stop_token_ids"]:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    for stop in kwargs["stop_strings"]:
        if stop in text:
            text = text[: text.index(stop)]
    return text
