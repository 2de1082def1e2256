"""The docs' figures of training, sampling and sizing, each computed by the project's own code:
learning-rate schedules (minillm.schedule), temperature / top-k / top-p on a trained model's
next-token distribution (minillm.torch.sampling), parameters and FLOPs per component
(Transformer.num_parameters / flops_per_token), the DPO loss (minillm.torch.dpo) and training
memory per rank (minillm.commands.inspect).

As in fig_basics: `*_numbers` computes what is drawn (tested), `draw_*` (ctx) draws it.
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.config import ModelConfig, TrainConfig
from minillm.memory import memory_per_rank, peak
from minillm.schedule import lr_at, schedule_step
from minillm.torch.dpo import dpo_loss
from minillm.torch.model import Transformer
from minillm.torch.sampling import SamplingConfig, mask_padded_vocab, process_logits
from minillm.torch.sft import load_for_inference
from minillm.viz.fig_basics import plt_figure, shown

GiB = 2**30


# --- learning-rate schedules ----------------------------------------------------------------------
def schedule_numbers(max_steps: int = 1000, warmup_steps: int = 50) -> dict:
    """lr at every step under each schedule of TrainConfig (one step budget), and wsd under a time
    budget at two step rates: the decay lands at the end of the time either way (schedule_step)."""
    base = dict(max_steps=max_steps, warmup_steps=warmup_steps, lr=1e-3, min_lr=1e-4, decay_frac=0.2)
    steps = np.arange(max_steps + 1)
    lrs = {kind: [lr_at(s, TrainConfig(schedule=kind, **base)) for s in steps]
           for kind in ("cosine", "wsd", "constant")}
    timed = TrainConfig(schedule="wsd", max_time=60.0, **{**base, "max_steps": 100_000})
    by_time = {}
    for rate in (10.0, 25.0):  # steps per second
        n = int(60 * rate)
        at = [lr_at(s, timed, schedule_step(timed, s, elapsed=(s + 1) / rate)) for s in range(n)]
        by_time[rate] = (np.arange(1, n + 1) / rate, at)
    return dict(steps=steps, lrs=lrs, by_time=by_time)


def draw_lr_schedules(ctx) -> None:
    numbers = schedule_numbers()
    fig, (by_step, by_time) = plt_figure(1, 2, figsize=(13, 4.5))
    for kind, lrs in numbers["lrs"].items():
        by_step.plot(numbers["steps"], lrs, label=kind, lw=2)
    by_step.set(xlabel="optimizer step", ylabel="learning rate",
                title="Schedules over a 1000-step budget (warmup 50, lr 1e-3 → min_lr 1e-4)")
    by_step.legend()
    for rate, (seconds, lrs) in numbers["by_time"].items():
        by_time.plot(seconds, lrs, label=f"{rate:.0f} steps/s ({len(lrs)} steps)", lw=2)
    by_time.set(xlabel="training time (s)", ylabel="learning rate",
                title="wsd under max_time = 60 s: the decay follows the clock")
    by_time.legend()
    for ax in (by_step, by_time):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    ctx.save(fig, "lr-schedules.png")


# --- sampling: which tokens survive each filter ---------------------------------------------------
PROMPT = "KING RICHARD III:\nNow is the winter of our disc"
QUICK_PROMPT = "Bob sees the "  # the test model's corpus has no capitals beyond the names
SETTINGS = {"temperature 0.5": SamplingConfig(temperature=0.5), "temperature 1": SamplingConfig(),
            "temperature 1.5": SamplingConfig(temperature=1.5), "top-k 5": SamplingConfig(top_k=5),
            "top-p 0.9": SamplingConfig(top_p=0.9)}


@torch.no_grad()
def next_token_logits(run, prompt: str) -> tuple[torch.Tensor, object]:
    """The trained model's logits (V,) for the token after `prompt`, and its tokenizer."""
    model, tokenizer = load_for_inference(run)
    ids = torch.tensor([tokenizer.encode(prompt)])
    logits = model(ids)[0, -1].float()
    return mask_padded_vocab(logits[None], tokenizer.vocab_size)[0], tokenizer


def sampling_numbers(logits: torch.Tensor, settings: dict = SETTINGS) -> dict:
    """Each setting's distribution after minillm.torch.sampling's filters: {name: probs (V,)}."""
    return {name: torch.softmax(process_logits(logits[None], cfg), dim=-1)[0].numpy()
            for name, cfg in settings.items()}


def draw_sampling(ctx) -> None:
    prompt = QUICK_PROMPT if ctx.quick else PROMPT
    logits, tokenizer = next_token_logits(ctx.run(), prompt)
    numbers = sampling_numbers(logits)
    order = np.argsort(-numbers["temperature 1"])[:16]  # the 16 likeliest tokens at T = 1
    labels = [shown(tokenizer.decode([int(i)])) for i in order]
    fig, axes = plt_figure(len(numbers), 1, figsize=(10, 11), sharex=True)
    for ax, (name, probs) in zip(axes, numbers.items()):
        kept = probs[order] > 0
        ax.bar(np.arange(len(order)), probs[order], color="C0", label="after the setting")
        if name != "temperature 1":  # the unfiltered distribution behind, to see the renormalisation
            ax.bar(np.arange(len(order)), numbers["temperature 1"][order], fill=False, edgecolor="0.3",
                   linestyle="--", label="temperature 1, no filter")
            ax.legend(loc="upper right", fontsize=9)
        for x in np.flatnonzero(~kept):
            ax.text(x, 0.01, "✕", ha="center", va="bottom", color="C3", fontsize=12)
        survivors = int((probs > 0).sum())
        ax.set(ylabel="probability", ylim=(0, 1.15 * max(p.max() for p in numbers.values())))
        ax.set_title(f"{name}: {survivors} of {len(probs)} tokens can be drawn", loc="left", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(np.arange(len(order)), labels, fontsize=12, family="monospace")
    axes[-1].set_xlabel("next token (the 16 likeliest at temperature 1; ✕ = filtered out, ␣ = space)")
    fig.suptitle(f"Next-token distribution of the trained char model after “{shown(prompt)}”")
    ctx.save(fig, "sampling.png")


# --- parameters and FLOPs per component ----------------------------------------------------------
PRESETS = ("gpt-char", "llama-tiny", "llama-40m", "gpt2-small")
COLOURS = {"embeddings": "C0", "attention": "C1", "attention (projections)": "C1", "attention (scores)": "C6",
           "MLP": "C2", "norms": "C3", "lm_head": "C4", "output matmul": "C4"}
LEGEND = {"embeddings": "embeddings (a tied table is the lm_head too)",
          "output matmul": "output matmul (lm_head or the tied table)"}


def component(name: str) -> str:
    """Which part of the model a canonical parameter name belongs to."""
    if name.startswith(("tok_emb", "pos_emb")):
        return "embeddings"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name or ".experts." in name or ".router." in name:
        return "MLP"
    return "lm_head" if name.startswith("lm_head") else "norms"


def params_flops_numbers(preset: str) -> dict:
    """Parameters per component (summing to Transformer.num_parameters), and training FLOPs per
    token at max_seq_len per component (summing to Transformer.flops_per_token): 6 x the matmul
    parameters of each part (the output matmul uses the tied table or lm_head), and attention's
    scores (QKᵀ and AV), whatever of flops_per_token the parameters do not account for."""
    config = ModelConfig.preset(preset)
    with torch.device("meta"):  # shapes only
        model = Transformer(config)
    params = dict.fromkeys(("embeddings", "attention", "MLP", "norms", "lm_head"), 0)
    for name, p in model.named_parameters():  # a tied table is listed once, as tok_emb
        params[component(name)] += p.numel()
    assert sum(params.values()) == model.num_parameters()
    total = model.flops_per_token(config.max_seq_len)
    flops = {"attention (projections)": 6 * params["attention"], "attention (scores)": 0,
             "MLP": 6 * params["MLP"], "norms": 6 * params["norms"],
             "output matmul": 6 * config.vocab_size * config.d_model}
    flops["attention (scores)"] = total - sum(flops.values())
    return dict(params=params, flops=flops, seq_len=config.max_seq_len)


def _stacked(ax, rows: dict[str, dict[str, int]], unit: float, unit_name: str, title: str) -> None:
    """Horizontal bars, one per preset, split into each component's share (%), total at the end."""
    names = list(rows)
    left = np.zeros(len(names))
    for part in next(iter(rows.values())):
        share = np.array([100 * rows[n][part] / sum(rows[n].values()) for n in names])
        ax.barh(names, share, left=left, label=LEGEND.get(part, part), color=COLOURS[part])
        for y, (x, s) in enumerate(zip(left, share)):
            if s >= 6:
                ax.text(x + s / 2, y, f"{s:.0f}%", ha="center", va="center", color="white", fontsize=9)
        left += share
    for y, n in enumerate(names):
        ax.text(101, y, f"{sum(rows[n].values()) / unit:,.1f} {unit_name}", va="center", fontsize=9)
    ax.set(xlim=(0, 125), xlabel="share of the total (%)", title=title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.45, -0.18), ncol=2, fontsize=9)


def draw_params_flops(ctx) -> None:
    numbers = {p: params_flops_numbers(p) for p in PRESETS}
    fig, (params, flops) = plt_figure(1, 2, figsize=(14, 4.6))
    _stacked(params, {p: n["params"] for p, n in numbers.items()}, 1e6, "M", "Parameters by component")
    _stacked(flops, {f"{p} (T={n['seq_len']})": n["flops"] for p, n in numbers.items()}, 1e6, "MFLOP",
             "Training FLOPs per token (6N + 12·L·D·T) by component")
    fig.suptitle("Model presets (ModelConfig.preset): where the parameters and the compute go")
    ctx.save(fig, "params-flops.png")


# --- DPO: loss and gradient weight against the margin ----------------------------------------------
def dpo_numbers(betas=(0.1, 0.5, 1.0, 2.0), margins=np.linspace(-10, 10, 201)) -> dict:
    """For each beta, the DPO loss (minillm.torch.dpo.dpo_loss) of one pair whose log-ratio margin
    h = (log π/π_ref)(chosen) - (log π/π_ref)(rejected) takes each value, and the weight of its
    gradient, |dL/dh| / beta (the paper's sigma(r_rejected - r_chosen)), by autograd."""
    losses, weights = {}, {}
    for beta in betas:
        h = torch.tensor(margins, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(())
        per_pair = [dpo_loss(h[i:i + 1], zero[None], zero[None], zero[None], beta)[0] for i in range(len(h))]
        loss = torch.stack(per_pair)
        loss.sum().backward()
        losses[beta], weights[beta] = loss.detach().numpy(), (-h.grad / beta).numpy()
    return dict(margins=np.asarray(margins), losses=losses, weights=weights)


def draw_dpo_loss(ctx) -> None:
    numbers = dpo_numbers()
    fig, (loss, weight) = plt_figure(1, 2, figsize=(13, 4.5))
    for beta in numbers["losses"]:
        loss.plot(numbers["margins"], numbers["losses"][beta], label=f"β = {beta}", lw=2)
        weight.plot(numbers["margins"], numbers["weights"][beta], label=f"β = {beta}", lw=2)
    loss.set(xlabel="log-ratio margin h (nats): chosen minus rejected, policy vs reference",
             ylabel="loss -log σ(β·h)", title="DPO loss (Rafailov et al. 2023)")
    weight.set(xlabel="log-ratio margin h (nats)", ylabel="gradient weight σ(-β·h)",
               title="Pairs already ranked right (h > 0) stop pushing")
    for ax in (loss, weight):
        ax.axvline(0, color="0.6", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    ctx.save(fig, "dpo-loss.png")


# --- training memory per rank ----------------------------------------------------------------------
def memory_numbers(preset: str = "gpt2-small", worlds=(1, 2, 4, 8), batch_size: int = 16,
                   block_size: int = 1024, checkpointing: bool = False) -> dict:
    """minillm inspect's estimate per rank, {parallel: [(parts, peak) per world size]} (bytes)."""
    out = {}
    for parallel in ("ddp", "fsdp"):
        train = TrainConfig(model=ModelConfig.preset(preset), batch_size=batch_size, block_size=block_size,
                            parallel=parallel, activation_checkpointing=checkpointing)
        out[parallel] = [(memory_per_rank(train, w), peak(memory_per_rank(train, w))) for w in worlds]
    return dict(worlds=list(worlds), memory=out, preset=preset, batch_size=batch_size, block_size=block_size)


def _memory_bars(ax, numbers: dict, title: str) -> None:
    """Per world size a DDP and an FSDP (hatched) bar, stacked by part, the peak as a black tick."""
    worlds = numbers["worlds"]
    x, width = np.arange(len(worlds)), 0.38
    parts = list(numbers["memory"]["ddp"][0][0])
    bars = ((-width / 2 - 0.01, "ddp", ""), (width / 2 + 0.01, "fsdp", "//"))  # FSDP hatched
    for offset, parallel, hatch in bars:
        bottom = np.zeros(len(worlds))
        for i, part in enumerate(parts):
            size = np.array([m[part] for m, _ in numbers["memory"][parallel]]) / GiB
            ax.bar(x + offset, size, width, bottom=bottom, color=f"C{i}", hatch=hatch, edgecolor="white",
                   label=part if parallel == "ddp" else None)
            bottom += size
        peaks = np.array([p for _, p in numbers["memory"][parallel]]) / GiB
        ax.plot(x + offset, peaks, "k_", ms=22, mew=2,
                label="peak (all but half the gradients)" if parallel == "ddp" else None)
        for xi, top in zip(x + offset, bottom):
            ax.annotate(parallel.upper(), (xi, top), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=8)
    ax.set_xticks(x, [f"{w} rank{'s' if w > 1 else ''}" for w in worlds])
    ax.set(ylabel="GiB per rank (fp32 weights, AdamW)", xlabel="world size (global batch split across ranks)",
           title=title)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def draw_memory_per_rank(ctx) -> None:
    fig, axes = plt_figure(1, 2, figsize=(14, 5))
    for ax, checkpointing in zip(axes, (False, True)):
        numbers = memory_numbers(checkpointing=checkpointing)
        title = "with activation checkpointing" if checkpointing else "every activation kept"
        _memory_bars(ax, numbers, title)
    fig.suptitle(f"Training memory per rank (minillm inspect), {numbers['preset']}, global batch "
                 f"{numbers['batch_size']} × {numbers['block_size']} tokens: DDP replicates the state, "
                 "FSDP (hatched) shards it")
    ctx.save(fig, "memory-per-rank.png")


FIGURES = {"lr-schedules.png": draw_lr_schedules, "sampling.png": draw_sampling,
           "params-flops.png": draw_params_flops, "dpo-loss.png": draw_dpo_loss,
           "memory-per-rank.png": draw_memory_per_rank}
