"""Figures drawn from a trained model (ctx.run(), a small char-level LLaMA-style model): its loss
curves, the residual stream's norm through the blocks, the KV cache's speed-up, and which tokens of
a chat example fine-tuning trains on. Each figure is a function that computes its numbers with the
project's own code (tests/torch/test_fig_model.py checks them) and one that draws them."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from minillm.checkpoint import load_run
from minillm.data import sft
from minillm.torch.generate import generate
from minillm.torch.introspect import residual_stream
from minillm.torch.model import load_model, model_from_params
from minillm.viz.metrics import MetricsLog

# What the figures feed the model: plain words whose characters both the built-in corpus and the
# tests' tiny corpus hold (a char tokenizer encodes only the characters it was built from).
PROMPT = "Where does Anne see the moon? By the river, by the tower.\n"
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where is the moon?"},
        {"role": "assistant", "content": "By the sea."}]


def token_label(piece: str) -> str:
    """A token's text as an axis label: spaces and line breaks made visible."""
    return piece.replace(" ", "␣").replace("\n", "\\n")


def prompt_ids(tokenizer, length: int, text: str = PROMPT) -> list[int]:
    """`length` ids of `text`, repeated as often as needed."""
    ids = tokenizer.encode(text)
    return (ids * (length // len(ids) + 1))[:length]


# --- loss-curves.png ------------------------------------------------------------------------------
def loss_curves(run: Path) -> dict[str, list[tuple[float, float]]]:
    """From the run's metrics.jsonl: train / val loss against tokens seen, tokens/s against step."""
    rows = MetricsLog(Path(run) / "metrics.jsonl").rows()
    if not rows:
        raise ValueError(f"{Path(run) / 'metrics.jsonl'}: no metrics logged")
    return {"train": [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss") is not None],
            "val": [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None],
            "speed": [(r["step"], r["tokens_per_s"]) for r in rows if r.get("tokens_per_s") is not None]}


def draw_loss_curves(ctx) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    curves = loss_curves(ctx.run())
    fig, (loss, speed) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    loss.plot(*zip(*curves["train"]), linewidth=1, label="train (one batch)")
    if curves["val"]:
        loss.plot(*zip(*curves["val"]), "o-", label="val (held-out text)")
    loss.set(xlabel="tokens seen", ylabel="cross-entropy loss (nats/token)", title="Loss while training")
    loss.xaxis.set_major_formatter(EngFormatter())  # 200k, 400k, ... tokens
    loss.legend()
    steps, rate = zip(*curves["speed"])
    speed.plot(steps, rate, linewidth=1)
    speed.axhline(statistics.median(rate), color="gray", linestyle="--",
                  label=f"median {statistics.median(rate):,.0f} tokens/s")
    speed.set(xlabel="optimizer step", ylabel="training throughput (tokens/s)", ylim=(0, None),
              title="Training speed (this CPU, shared cores)")
    speed.legend()
    for ax in (loss, speed):
        ax.grid(alpha=0.3)
    fig.suptitle("A char-level LLaMA-style model trained on Shakespeare: metrics.jsonl of its run")
    return ctx.save(fig, "loss-curves.png")


# --- residual-norms.png ---------------------------------------------------------------------------
def residual_streams(run: Path, text: str = PROMPT) -> tuple[list[str], torch.Tensor]:
    """The residual stream x of a prompt after the embedding and after each block
    (minillm.torch.introspect.residual_stream): (token labels, x (n_layers + 1, T, D))."""
    model, tokenizer = load_model(run)
    ids = tokenizer.encode(text)[:model.config.max_seq_len]
    return [token_label(tokenizer.decode([i])) for i in ids], residual_stream(model, ids)


def draw_residual_norms(ctx) -> Path:
    import matplotlib.pyplot as plt

    labels, streams = residual_streams(ctx.run())
    norms = streams.norm(dim=-1).numpy()  # (L + 1, T)
    layers = np.arange(len(norms))
    fig, (line, heat) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1, 2.6]},
                                     layout="constrained")
    line.plot(layers, norms, color="tab:blue", alpha=0.15, linewidth=1)
    line.plot(layers, norms.mean(1), "o-", color="tab:blue", linewidth=2, label="mean over tokens")
    line.set(yscale="log", xticks=layers, xticklabels=["emb"] + [str(i) for i in layers[1:]],
             xlabel="after block",
             ylabel="‖x‖ (L2 norm of the residual stream)", title="Each block adds to the stream")
    line.legend()
    line.grid(alpha=0.3)
    image = heat.imshow(norms[1:], aspect="auto", cmap="viridis", origin="lower")  # the blocks' outputs
    heat.set_xticks(range(len(labels)), labels, fontsize=9, fontfamily="monospace")
    heat.set_yticks(layers[:-1], [f"block {i}" for i in layers[1:]])
    heat.set(xlabel="token of the prompt", title="‖x‖ per token after each block")
    fig.colorbar(image, ax=heat, label="‖x‖")
    fig.suptitle("Residual stream norm through the model (before the final RMSNorm)")
    return ctx.save(fig, "residual-norms.png")


# --- kv-cache-speedup.png -------------------------------------------------------------------------
@torch.inference_mode()
def uncached_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """What the KV cache saves: every step runs the whole sequence so far through the model."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _median_seconds(fn, repeats: int):
    """(median wall time of `repeats` calls, the last call's result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def kv_cache_timings(run: Path, lengths: list[int], new_tokens: int, repeats: int = 3) -> dict:
    """ms per new token of greedy decoding after prompts of each length, with the project's
    generate (KV cache) and with uncached_greedy; both decodes' tokens, to check they agree."""
    config, tokenizer, params = load_run(run)
    if config.positions == "learned":  # a learned table ends at max_seq_len
        lengths = [n for n in lengths if n + new_tokens <= config.max_seq_len]
    else:  # RoPE / sinusoidal / ALiBi positions are computed: the same weights run past the trained
        # length (the text is then unlike training's, but the arithmetic, i.e. the time, is the same)
        config = dataclasses.replace(config, max_seq_len=max(lengths) + new_tokens)
    model = model_from_params(config, params).eval()
    out = {"lengths": lengths, "cached_ms": [], "uncached_ms": [], "cached": [], "uncached": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy shared CPU two threads wait on each other: times swing 10x
    try:
        generate(model, prompt_ids(tokenizer, lengths[0]), 2, temperature=0)  # warm-up: first-call costs
        for n in lengths:
            prompt = prompt_ids(tokenizer, n)
            for kind, decode in (("cached", lambda: generate(model, prompt, new_tokens, temperature=0)),
                                 ("uncached", lambda: uncached_greedy(model, prompt, new_tokens))):
                seconds, tokens = _median_seconds(decode, repeats)
                out[f"{kind}_ms"].append(1000 * seconds / new_tokens)
                out[kind].append(tokens)
    finally:
        torch.set_num_threads(threads)
    return out


def draw_kv_cache_speedup(ctx) -> Path:
    import matplotlib.pyplot as plt

    lengths = [16, 32, 64] if ctx.quick else [32, 64, 128, 256, 512, 1024]
    new_tokens = 4 if ctx.quick else 32
    t = kv_cache_timings(ctx.run(), lengths, new_tokens)
    speedup = np.array(t["uncached_ms"]) / np.array(t["cached_ms"])
    fig, (ms, ratio) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    ms.plot(t["lengths"], t["uncached_ms"], "s-", label="without cache: whole sequence every step")
    ms.plot(t["lengths"], t["cached_ms"], "o-", label="with KV cache (minillm.torch.generate)")
    ms.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="ms per new token",
           title=f"Greedy decoding of {new_tokens} tokens (this CPU, 1 thread, median of 3)")
    ms.set_xticks(t["lengths"], [str(n) for n in t["lengths"]])  # plain numbers on the log axes
    ms.set_xticks([], minor=True)
    ms.yaxis.set_major_formatter("{x:g}")
    ms.yaxis.set_minor_formatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else "")
    ms.legend()
    ratio.bar([str(n) for n in t["lengths"]], speedup, color="tab:green")
    for i, s in enumerate(speedup):
        ratio.text(i, s, f"{s:.1f}×", ha="center", va="bottom")
    ratio.set(xlabel="prompt length (tokens)", ylabel="speed-up (uncached ms / cached ms)",
              title="The cache's speed-up grows with the context")
    for ax in (ms, ratio):
        ax.grid(alpha=0.3)
    return ctx.save(fig, "kv-cache-speedup.png")


# --- sft-labels.png -------------------------------------------------------------------------------
def sft_targets(tokenizer, messages: list[dict] = CHAT) -> tuple[list[int], list[bool]]:
    """A chat rendered by the template and batched by minillm.data.sft as fine-tuning sees it:
    (ids, trained), trained[i] = token i is a loss target (position i - 1's label is not -100)."""
    examples = sft.tokenize(tokenizer, [messages], block_size=10**9)
    n = int(examples.lengths[0])
    batches = sft.SFTBatches(examples, n - 1, 1, tokenizer.special_id("pad"), pad_multiple=1)
    x, y = batches.batch(0)  # (1, n - 1) each: y = x shifted by one, -100 where not trained
    ids = x[0].tolist() + [int(examples.tokens[n - 1])]
    return ids, [False] + (y[0] != sft.IGNORE_INDEX).tolist()


def draw_sft_labels(ctx) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    _, tokenizer, _ = load_run(ctx.run())
    ids, trained = sft_targets(tokenizer)
    width = 34  # characters per row of boxes
    boxes, x, row = [], 0, 0
    for token, target in zip(ids, trained):  # lay the tokens out left to right, wrapping rows
        label = token_label(tokenizer.decode([token]))
        w = max(len(label), 1) + 0.4
        if x + w > width:
            x, row = 0, row + 1
        boxes.append((x, row, w, label, target))
        x += w
    fig, ax = plt.subplots(figsize=(12, 0.9 * (row + 1) + 1.2))
    colors = {True: "#7fc97f", False: "#d9d9d9"}
    for x, row, w, label, target in boxes:
        ax.add_patch(Rectangle((x, -row - 0.8), w - 0.1, 0.7, facecolor=colors[target], edgecolor="gray"))
        ax.text(x + (w - 0.1) / 2, -row - 0.45, label, ha="center", va="center", fontsize=13,
                fontfamily="monospace")
    ax.set(xlim=(0, width), ylim=(-row - 1, 0), xticks=[], yticks=[])
    ax.legend(handles=[Patch(color=colors[True], label="trained: the loss predicts this token"),
                       Patch(color=colors[False], label="context only: its label is -100 (masked)")],
                      loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, fontsize=11, frameon=False)
    ax.set_title("A chat example as fine-tuning sees it: only the answer and its <|eos|> are trained",
                 fontsize=13)
    for side in ax.spines.values():
        side.set_visible(False)
    return ctx.save(fig, "sft-labels.png")


FIGURES = {
    "loss-curves.png": draw_loss_curves,
    "residual-norms.png": draw_residual_norms,
    "kv-cache-speedup.png": draw_kv_cache_speedup,
    "sft-labels.png": draw_sft_labels,
}
