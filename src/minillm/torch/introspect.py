"""Looking inside a decoder-only model on one text: its attention weights and its logit lens.

attention_maps: every layer's and head's softmax(q kᵀ / sqrt(hd) + mask) for the text, from the
    readable attention path that keeps its weights (layers.Attention, keep_weights=True).
lens_logits / logit_lens: the logit lens (nostalgebraist 2020): the model's own final norm and
    lm_head applied to the residual stream after each block, i.e. what the model would predict if
    it stopped there. The last row is the model's real prediction.
next_token_probs: the model's next-token distribution at each generated token, for
    minillm.diagnose (entropy) after `minillm sample --diagnose`.

Shapes: L blocks, H query heads, T tokens of the text, V vocabulary, k top guesses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minillm.checkpoint import load_config
from minillm.torch.model import Transformer
from minillm.torch.sft import load_for_inference


def check_inspectable(config, what: str) -> None:
    """ValueError naming the field when `what` ("attention maps", "the logit lens") does not apply."""
    if config.encoder_layers:
        raise ValueError(f"encoder_layers={config.encoder_layers}: an encoder-decoder run; {what} are "
                         f"implemented for decoder-only models")
    if what == "attention maps" and config.attention != "softmax":
        raise ValueError(f"attention={config.attention!r}: linear attention forms no T x T weights "
                         f"(no softmax over keys), so there are no attention maps to draw")


def load_inspected(run: str | Path, adapter: str | Path | None, text: str, what: str):
    """(model, tokenizer, ids) for inspecting `text` with a run (full, LoRA, aligned or quantized),
    or a one-line ValueError: encoder-decoder / linear attention, no tokenizer, empty text, text
    longer than the context."""
    check_inspectable(load_config(run), what)
    if not text:
        raise ValueError("--text is empty; give the text to look at")
    model, tokenizer = load_for_inference(run, adapter)
    if tokenizer is None:
        raise ValueError(f"run directory {run} has no tokenizer.json; encoding --text needs one")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"--text {text!r} encodes to no tokens")
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"--text is {len(ids)} tokens, longer than the model's context "
                         f"(max_seq_len {model.config.max_seq_len}); shorten it")
    return model, tokenizer, ids


@torch.no_grad()
def attention_maps(model: Transformer, ids: list[int]) -> np.ndarray:
    """(L, H, T, T) float32 attention weights of one text: [l, h, i, j] is how much query i of head
    h in block l attends to key j (rows sum to 1; j > i is 0 under the causal mask). Grouped-query
    heads are shown per query head (each K/V head repeated for its group)."""
    check_inspectable(model.config, "attention maps")
    model.eval()
    model(torch.tensor([ids]), keep_weights=True)  # each block keeps its weights (B, H, T, T)
    maps = [block.attn.last_weights[0].float().numpy() for block in model.blocks]
    for block in model.blocks:
        block.attn.last_weights = None  # do not hold on to T x T tensors
    return np.stack(maps)


@torch.no_grad()
def residual_stream(model: Transformer, ids: list[int]) -> torch.Tensor:
    """(L + 1, T, D): the residual stream after the embeddings (token + position) and after each
    block, caught by forward hooks while Transformer.hidden runs (the model's own loop)."""
    model.eval()
    stream: list[torch.Tensor] = []
    keep = lambda module, inputs, output: stream.append(output[0])  # noqa: E731
    hooks = [model.drop.register_forward_hook(keep)]  # model.drop's output is the embedded input
    hooks += [block.register_forward_hook(keep) for block in model.blocks]
    try:
        model.hidden(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(stream)


@torch.no_grad()
def lens_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """(L + 1, T, V) logits of the logit lens: row 0 reads the embeddings (token + position), row
    l + 1 the residual stream after block l, each through the final norm and lm_head; the last row
    equals model(ids)."""
    check_inspectable(model.config, "the logit lens")
    return model.lm_head(model.norm(residual_stream(model, ids))).float()  # (L + 1, T, V)


def lens_rows(model: Transformer) -> list[str]:
    """Names of the lens rows: "embed", then "block 0" .. "block L-1"."""
    return ["embed"] + [f"block {i}" for i in range(len(model.blocks))]


def logit_lens(model: Transformer, ids: list[int], top_k: int = 3,
               vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top_k next-token guesses after each layer: ids (L + 1, T, k) int64 and their
    probabilities (L + 1, T, k) float32, most likely first. vocab_size: ignore ids from it on (a
    table padded beyond the tokenizer's vocabulary)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    logits = lens_logits(model, ids)[..., :vocab_size]  # (L + 1, T, V)
    probs, top = torch.softmax(logits, dim=-1).topk(min(top_k, logits.size(-1)), dim=-1)
    return top.numpy(), probs.numpy()


@torch.no_grad()
def next_token_probs(model: Transformer, prompt: list[int], output: list[int],
                     vocab_size: int | None = None) -> np.ndarray:
    """(len(output), V) float64: row i is the model's distribution (temperature 1, no filter) over
    the token output[i], given prompt + output[:i], computed in one forward pass (teacher forcing).
    The prompt must not be empty; prompt + output must fit max_seq_len."""
    if not prompt:
        raise ValueError("next_token_probs needs a prompt of at least one token")
    tokens = (prompt + output)[:-1] if output else prompt
    if len(tokens) > model.config.max_seq_len:
        raise ValueError(f"prompt + output are {len(tokens) + 1} tokens; scoring them in one pass needs at "
                         f"most max_seq_len + 1 = {model.config.max_seq_len + 1}")
    logits = model.eval()(torch.tensor([tokens]))[0, len(prompt) - 1:, :vocab_size]  # (len(output), V)
    return torch.softmax(logits.double(), dim=-1).numpy()[: len(output)]
