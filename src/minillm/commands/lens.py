"""`minillm lens`: the logit lens of a text, the top next-token guesses after each layer."""

from __future__ import annotations

import argparse
import json

from minillm.commands.attention import add_inspect_args
from minillm.diagnose import token_label
from minillm.viz.attention import lens_figure, save_figure


def register(sub) -> None:
    p = sub.add_parser("lens", help="logit lens: the top next-token guesses after each layer",
                       description="Read the residual stream of a text after the embeddings and after "
                                   "each block through the model's final norm and lm_head (the logit "
                                   "lens): what the model would predict if it stopped there. Prints a "
                                   "table, one row per position, one column per layer.",
                       epilog='example: minillm lens --run runs/shakespeare-char --text "ROMEO: But soft" '
                              '--top-k 3')
    add_inspect_args(p)
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="guesses per cell (default 3)")
    p.add_argument("--out", metavar="FILE.png", help="also draw the top guesses as a heat map")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillm.torch.introspect import lens_rows, load_inspected, logit_lens

    model, tokenizer, ids = load_inspected(args.run, args.adapter, args.text, "the logit lens")
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)  # never a padding id of the table
    top, probs = logit_lens(model, ids, args.top_k, vocab)  # (R, T, k) each
    rows, tokens = lens_rows(model), [tokenizer.decode([i]) for i in ids]
    words = [[[tokenizer.decode([int(i)]) for i in cell] for cell in row] for row in top]  # (R, T, k)
    if args.out:
        save_figure(lens_figure(rows, tokens, [[cell[0] for cell in row] for row in words], probs[..., 0]),
                    args.out)
    if args.json:
        guesses = [[[{"id": int(i), "token": w, "prob": round(float(p), 6)} for i, w, p in zip(*cell)]
                    for cell in zip(*row)] for row in zip(top, words, probs)]
        print(json.dumps({"tokens": tokens, "ids": ids, "rows": rows, "top_k": int(top.shape[-1]),
                          "guesses": guesses, **({"out": args.out} if args.out else {})}))
    else:
        print(lens_table(rows, tokens, words, probs))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def lens_table(rows: list[str], tokens: list[str], words: list, probs) -> str:
    """Text table: a line per position (its token, the token that really follows), a column per
    lens row holding its top guesses as 'token .pp' (probability, two decimals)."""
    def cell(r: int, t: int) -> str:  # e.g. "e .52 a .10 ␣ .05"
        guesses = zip(words[r][t], probs[r, t])
        return " ".join(f"{token_label(w)} {f'{p:.2f}'.lstrip('0')}" for w, p in guesses)

    cells = [[cell(r, t) for r in range(len(rows))] for t in range(len(tokens))]  # (T, R)
    widths = [max(len(rows[r]), *(len(line[r]) for line in cells)) for r in range(len(rows))]
    labels = [token_label(t) for t in tokens]
    following = labels[1:] + ["?"]  # what really comes next; unknown after the last token
    tok_w, next_w = max(5, *map(len, labels)), max(4, *map(len, following))
    head = f"{'pos':>3}  {'token':<{tok_w}}  {'next':<{next_w}} | " + " | ".join(
        r.ljust(w) for r, w in zip(rows, widths))
    lines = [f"{t:>3}  {labels[t]:<{tok_w}}  {following[t]:<{next_w}} | "
             + " | ".join(c.ljust(w) for c, w in zip(cells[t], widths)) for t in range(len(tokens))]
    note = "top guesses for the next token after each layer, with their probabilities; '␣' is a space"
    return "\n".join(line.rstrip() for line in [note, head, "-" * len(head.rstrip()), *lines])
