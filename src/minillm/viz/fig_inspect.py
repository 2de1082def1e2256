"""The docs' figures of `minillm attention` and `minillm lens`, drawn on the figures' trained model
(FigureContext.run) with a line of Shakespeare: the same code a user runs from the command line."""

from __future__ import annotations

from minillm.viz.attention import attention_grid, lens_figure

ATTENTION_TEXT = "But soft, what light"  # short: every token stays readable on a 4 x 4 grid
LENS_TEXT = "ROMEO: But soft, what light"


def _model(ctx, text: str):
    from minillm.torch.introspect import load_inspected

    return load_inspected(ctx.run(), None, text, "attention maps")


def draw_attention_maps(ctx) -> None:
    from minillm.torch.introspect import attention_maps

    model, tokenizer, ids = _model(ctx, ATTENTION_TEXT)
    tokens = [tokenizer.decode([i]) for i in ids]
    title = f"attention weights of a character-level model on {ATTENTION_TEXT!r} (rows sum to 1)"
    ctx.save(attention_grid(attention_maps(model, ids), tokens, title=title), "attention-maps.png")


def draw_logit_lens(ctx) -> None:
    from minillm.torch.introspect import lens_rows, logit_lens

    model, tokenizer, ids = _model(ctx, LENS_TEXT)
    top, probs = logit_lens(model, ids, top_k=1, vocab_size=tokenizer.vocab_size)  # (R, T, 1) each
    guesses = [[tokenizer.decode([int(i)]) for i in row[:, 0]] for row in top]
    tokens = [tokenizer.decode([i]) for i in ids]
    ctx.save(lens_figure(lens_rows(model), tokens, guesses, probs[..., 0]), "logit-lens.png")


FIGURES = {"attention-maps.png": draw_attention_maps, "logit-lens.png": draw_logit_lens}
