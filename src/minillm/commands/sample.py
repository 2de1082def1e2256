"""`minillm sample`: continue a prompt with a trained model."""

from __future__ import annotations

import argparse
import sys

from minillm.checkpoint import load_config
from minillm.commands._generation import add_sampling_args, load_draft, load_for_generation, sampling_kwargs
from minillm.tokenizer.stream import special_ids, text_pieces


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
    p.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: > 0 favours long outputs")
    p.add_argument("--stream", action="store_true", help="print text as it comes (one sample at a time)")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch", help="framework running the model")
    p.add_argument("--draft", metavar="DIR",
                   help="speculative decoding: a smaller run with the same tokenizer proposes tokens that "
                        "--run verifies (same output distribution; greedy: the same text)")
    p.add_argument("--draft-k", type=int, default=4, metavar="K",
                   help="tokens the draft proposes per round (default 4)")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1 or args.num_beams < 1:
        raise ValueError("--num-samples and --num-beams must be >= 1")
    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if load_config(args.run).encoder_layers:  # an encoder-decoder: the prompt is the source it transforms
        return _run_seq2seq(args, text)
    if args.backend == "jax":
        return _run_jax(args, text)
    from minillm.torch.generate import generate, stream_text

    model, tokenizer = load_for_generation(args)
    ids = (tokenizer.encode(text) if text else []) or special_ids(tokenizer, "bos")  # empty: start at bos
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no bos token; give --prompt")
    kwargs = sampling_kwargs(args, model, tokenizer)
    # Sample i is seeded with seed + i, whether streamed one by one or generated as one batch.
    seeds = None if args.seed is None else [args.seed + i for i in range(args.num_samples)]
    if args.draft:
        return _run_speculative(args, text, ids, model, tokenizer, kwargs, seeds)
    if args.stream and args.num_beams == 1:  # a beam search result comes at once: no stream
        for i in range(args.num_samples):
            if i:
                print("---------------")
            sys.stdout.write(text)
            seed = None if seeds is None else seeds[i]
            for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, seed=seed, **kwargs):
                print(piece, end="", flush=True)
            print()
        return 0
    outs = generate(model, [ids] * args.num_samples, args.max_new_tokens, seed=seeds, tokenizer=tokenizer,
                    num_beams=args.num_beams, length_penalty=args.length_penalty, **kwargs)
    # Each continuation as the stream shows it: no stop token, cut before the first stop string.
    stops = kwargs["stop_strings"], kwargs["stop_token_ids"]
    print("\n---------------\n".join(text + "".join(text_pieces(out, tokenizer, *stops)) for out in outs))
    return 0


def _run_speculative(args: argparse.Namespace, text: str, ids: list[int], model, tokenizer, kwargs: dict,
                     seeds: list[int] | None) -> int:
    """--draft: each sample on its own (speculative decoding runs at batch 1), printed as --stream
    prints it (the same text the batched path prints)."""
    from minillm.torch.speculative import speculative_stream

    if args.num_beams > 1 or args.repetition_penalty not in (None, 1.0) or args.sliding_window:
        raise ValueError("--draft works with plain sampling only: no --num-beams, --repetition-penalty "
                         "or --sliding-window")
    draft = load_draft(args, model)
    for name in ("repetition_penalty", "context_overflow"):
        kwargs.pop(name)
    for i in range(args.num_samples):
        if i:
            print("---------------")
        sys.stdout.write(text)
        seed = None if seeds is None else seeds[i]
        tokens = speculative_stream(model, draft, ids, args.max_new_tokens, k=args.draft_k, seed=seed,
                                    tokenizer=tokenizer, **kwargs)
        for piece in text_pieces(tokens, tokenizer, kwargs["stop_strings"], kwargs["stop_token_ids"]):
            print(piece, end="", flush=args.stream)
        print()
    return 0


def _run_jax(args: argparse.Namespace, text: str) -> int:
    """The same sampler in JAX (minillm.jax.generate): every option but --stream, --compile and --draft."""
    if args.stream or args.compile or args.draft:
        raise ValueError("--backend jax has no --stream, --compile (its decode step is always jitted) "
                         "or --draft")
    from minillm.jax.generate import sample_texts

    outs = sample_texts(args.run, text, args.num_samples, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                        length_penalty=args.length_penalty, seed=args.seed, stop_strings=args.stop,
                        context_overflow="slide" if args.sliding_window else "error")
    print("\n---------------\n".join(text + out for out in outs))
    return 0


def _run_seq2seq(args: argparse.Namespace, text: str) -> int:
    """An encoder-decoder run (minillm.torch.seq2seq): print the output for the prompt, decoded
    greedily or with --num-beams; sampling options, --stream, --draft and --adapter do not apply."""
    if args.backend != "torch" or args.adapter or args.draft or args.num_samples != 1:
        raise ValueError(f"{args.run} is an encoder-decoder: --backend torch, one sample, "
                         f"no --adapter or --draft")
    from minillm.torch.seq2seq import load_seq2seq
    from minillm.torch.seq2seq_generate import transform_texts

    model, tokenizer = load_seq2seq(args.run)
    print(transform_texts(model, tokenizer, [text], args.max_new_tokens, args.num_beams)[0])
    return 0
