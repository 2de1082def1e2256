"""Two measures of a model: perplexity on a token array, over the windows of
`minillm.data.loader.eval_batches` (tail=True: every token after the first is predicted exactly
once, from up to block_size tokens; loss is the mean next-token cross-entropy in nats, perplexity
= exp(loss), bits = loss / ln 2), and greedy answers to a task set (scored by minillm.data.tasks).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from minillm.config import SINUSOID_SCALE
from minillm.data.loader import eval_batches
from minillm.data.tasks import few_shot_messages
from minillm.tokenizer import chat
from minillm.tokenizer.stream import text_pieces
from minillm.torch.generate import generate
from minillm.torch.layers import rope_tables, sinusoidal_table


def perplexity(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 8) -> dict:
    """Mean next-token loss of `model` over a 1-D array of ids (e.g. `read_tokens(path)`): returns
    {"tokens": ids predicted, "loss": nats per token, "perplexity", "bits_per_token"}."""
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in eval_batches(tokens, block_size, batch_size, tail=True):
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)  # (B, T) each
            logits = model(x)  # (B, T, V)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    loss = total / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2)}


def answer_tasks(model: torch.nn.Module, tokenizer, examples: list[dict], train: list[dict] | None = None,
                 shots: int = 0, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers to task examples (minillm.data.tasks): each prompt is the chat-template render
    of the conversation before its answer, after `shots` solved train examples of the same kind
    (few-shot, for a model never fine-tuned). Prompts are decoded in batches of similar length;
    a prompt longer than the context keeps its end."""
    room = model.config.max_seq_len - max_new_tokens
    prompts = [chat.render(tokenizer, few_shot_messages(train, e, shots) if shots else e["messages"][:-1],
                           add_generation_prompt=True)[-room:] for e in examples]
    stops = chat.stop_strings(tokenizer), chat.stop_token_ids(tokenizer)
    answers = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # little left-padding per batch
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        outs = generate(model, [prompts[i] for i in rows], max_new_tokens, temperature=0.0,
                        stop_token_ids=stops[1], stop_strings=stops[0], tokenizer=tokenizer)
        for i, out in zip(rows, outs):
            answers[i] = "".join(text_pieces(out, tokenizer, *stops))
    return answers


def extend_context(model, length: int):
    """The model over a longer context than it was trained on (to measure length extrapolation):
    the RoPE or sinusoid tables recomputed for `length` positions by the same formula, in place;
    ALiBi and no positions need nothing. Learned positions have no rows past max_seq_len."""
    c = model.config
    if length <= c.max_seq_len:
        return model
    if c.positions == "learned":
        raise ValueError(f"context {length}: learned positions have no rows past max_seq_len {c.max_seq_len}")
    if c.positions == "rope":
        cos, sin = rope_tables(length, c.head_dim, c.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(model.rope_cos), sin.to(model.rope_sin)
    if c.positions == "sinusoidal":
        model.sin_table = (SINUSOID_SCALE * sinusoidal_table(length, c.d_model)).to(model.sin_table)
    model.config = dataclasses.replace(c, max_seq_len=length)
    return model
