"""`minillm sample`: continue a prompt with a trained model."""

from __future__ import annotations

import argparse
import json
import sys

from minillm import diagnose
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
    p.add_argument("--diagnose", action="store_true",
                   help="after each sample, the entropy (bits) of the model's next-token distribution at "
                        "every generated token, and a warning naming the span when the output ends in a loop")
    p.add_argument("--json", action="store_true",
                   help="one JSON object on stdout: the samples' texts (with --diagnose, their diagnosis)")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1 or args.num_beams < 1:
        raise ValueError("--num-samples and --num-beams must be >= 1")
    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if (args.diagnose or args.json) and (args.stream or args.draft or args.backend != "torch"):
        raise ValueError("--diagnose and --json work on the torch backend's batched output: no --stream, "
                         "--draft or --backend jax")
    if load_config(args.run).encoder_layers:  # an encoder-decoder: the prompt is the source it transforms
        return _run_seq2seq(args, text)
    if args.backend == "jax":
        return _run_jax(args, text)
    from minillm.torch.generate import stream_text

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
    return _run_batched(args, text, ids, model, tokenizer, kwargs, seeds)


def _run_batched(args: argparse.Namespace, text: str, ids: list[int], model, tokenizer, kwargs: dict,
                 seeds: list[int] | None) -> int:
    """The samples as one batch (or a beam search each), printed together; with --diagnose each
    followed by its diagnosis (minillm.diagnose), with --json as one JSON object."""
    from minillm.torch.generate import generate

    if args.diagnose and len(ids) + args.max_new_tokens > model.config.max_seq_len + 1:
        raise ValueError(f"--diagnose scores prompt + output in one pass: the prompt's {len(ids)} tokens + "
                         f"--max-new-tokens {args.max_new_tokens} must fit max_seq_len "
                         f"{model.config.max_seq_len}")
    outs = generate(model, [ids] * args.num_samples, args.max_new_tokens, seed=seeds, tokenizer=tokenizer,
                    num_beams=args.num_beams, length_penalty=args.length_penalty, **kwargs)
    # Each continuation as the stream shows it: no stop token, cut before the first stop string.
    stops = kwargs["stop_strings"], kwargs["stop_token_ids"]
    texts = [text + "".join(text_pieces(out, tokenizer, *stops)) for out in outs]
    reports = [_diagnose(model, tokenizer, ids, out, stops[1], i, kwargs) if args.diagnose else None
               for i, out in enumerate(outs)]
    if args.json:
        samples = [{"text": t, **({"diagnosis": r} if r else {})} for t, r in zip(texts, reports)]
        print(json.dumps({"samples": samples}))
    else:
        print("\n---------------\n".join(t if r is None else f"{t}\n{diagnose.diagnosis_text(r)}"
                                           for t, r in zip(texts, reports)))
    return 0


def _diagnose(model, tokenizer, ids: list[int], out: list[int], stop_ids: list[int], i: int,
              kwargs: dict) -> dict:
    """minillm.diagnose's report of sample i: entropy per generated token (a final stop token
    left out) of the model's own distribution (temperature 1, no filter), and any loop."""
    from minillm.torch.introspect import next_token_probs

    output = out[:-1] if out and out[-1] in stop_ids else out
    probs = next_token_probs(model, ids, output, kwargs.get("vocab_size"))  # (len(output), V)
    return diagnose.diagnose(probs, output, tokenizer.decode, label=f"sample {i + 1}")


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
    if (args.backend != "torch" or args.adapter or args.draft or args.num_samples != 1 or args.diagnose
            or args.json):
        raise ValueError(f"{args.run} is an encoder-decoder: --backend torch, one sample, "
                         f"no --adapter, --draft, --diagnose or --json")
    from minillm.torch.seq2seq import load_seq2seq
    from minillm.torch.seq2seq_generate import transform_texts

    model, tokenizer = load_seq2seq(args.run)
    new = min(args.max_new_tokens, model.config.max_seq_len)  # the decoder reads bos + its output
    if new < args.max_new_tokens:
        print(f"note: --max-new-tokens {args.max_new_tokens} capped at the model's max_seq_len={new}",
              file=sys.stderr)
    print(transform_texts(model, tokenizer, [text], new, args.num_beams)[0])
    return 0
