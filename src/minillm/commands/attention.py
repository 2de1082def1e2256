"""`minillm attention`: draw a run's attention maps for a text, a grid of layers x heads."""

from __future__ import annotations

import argparse
import json

from minillm.viz.attention import attention_grid, save_figure


def register(sub) -> None:
    p = sub.add_parser("attention", help="draw the attention maps of a text (layers x heads)",
                       description="Run the model of a run directory on a text and draw every layer's "
                                   "and head's attention weights as a grid of heat maps: queries down, "
                                   "keys across, the text's tokens on both axes.",
                       epilog='example: minillm attention --run runs/shakespeare-char --text "ROMEO: '
                              'But soft!" --out attention.png --layers 0,1')
    add_inspect_args(p)
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--layers", type=index_list, metavar="I,J,...", help="layers to draw (default: all)")
    p.add_argument("--heads", type=index_list, metavar="I,J,...", help="heads to draw (default: all)")
    p.add_argument("--json", action="store_true",
                   help="also print one JSON object: tokens, layers, heads and the drawn weights")
    p.set_defaults(func=run)


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    """--run, --adapter, --text: what `minillm attention` and `minillm lens` look at."""
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory (full, LoRA, aligned or quantized: as `minillm sample` loads it)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter to merge into --run's weights")
    p.add_argument("--text", required=True,
                   help="the text to run through the model (at most max_seq_len tokens)")


def index_list(value: str) -> list[int]:
    """'0,2,3' -> [0, 2, 3] (argparse type)."""
    error = argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 like 0,1, got {value!r}")
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise error from None
    if not out or min(out) < 0:
        raise error
    return out


def check_indices(chosen: list[int] | None, count: int, what: str) -> list[int]:
    """The chosen layer/head indices, or all of them; a one-line error for one out of range."""
    if chosen is None:
        return list(range(count))
    bad = [i for i in chosen if i >= count]
    if bad:
        raise ValueError(f"--{what} {','.join(map(str, bad))}: the model has {count} {what} "
                         f"(0..{count - 1})")
    return chosen


def run(args: argparse.Namespace) -> int:
    from minillm.torch.introspect import attention_maps, load_inspected

    model, tokenizer, ids = load_inspected(args.run, args.adapter, args.text, "attention maps")
    layers = check_indices(args.layers, model.config.n_layers, "layers")
    heads = check_indices(args.heads, model.config.n_heads, "heads")
    weights = attention_maps(model, ids)  # (L, H, T, T)
    tokens = [tokenizer.decode([i]) for i in ids]
    path = save_figure(attention_grid(weights, tokens, layers, heads), args.out)
    if args.json:
        chosen = weights[layers][:, heads]  # (layers, heads, T, T)
        print(json.dumps({"out": str(path), "tokens": tokens, "layers": layers, "heads": heads,
                          "weights": chosen.round(6).tolist()}))
    else:
        print(f"wrote {path}: {len(layers)} layers x {len(heads)} heads, {len(ids)} tokens")
    return 0
