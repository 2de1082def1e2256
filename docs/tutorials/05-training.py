# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Training: from random weights to (almost) Shakespeare
#
# Training shows the model a window of text and asks it, at every position at once, for the next
# token. The **loss** is the cross-entropy: minus the log of the probability the model gave to the
# token that really came next, averaged over positions. An untrained model spreads its probability
# evenly, so its loss starts near `ln(vocab_size)`. The optimizer (AdamW) nudges every weight
# against the gradient of the loss, step after step.
#
# Pieces: the loss is `next_token_loss` in `src/minillm/torch/model.py`; the optimizer
# `src/minillm/torch/optim.py`; the learning-rate schedule `src/minillm/schedule.py`; the loop
# around the steps (evaluation, checkpoints, metrics) `src/minillm/train_loop.py`; the PyTorch
# side of a step `src/minillm/torch/train.py`. Files go under a work directory:
# `$MINILLM_TUTORIAL_DIR`, else `minillm-tutorials` in the system's temp directory. Tutorials 06-08
# reuse the model trained here.

# %%
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.cli import main as minillm
from minillm.config import train_config_from_dict
from minillm.torch.generate import generate
from minillm.torch.model import Transformer, load_model, next_token_loss
from minillm.torch.optim import decay_split
from minillm.torch.train import Trainer
from minillm.train_loop import train

WORK = Path(os.environ.get("MINILLM_TUTORIAL_DIR") or Path(tempfile.gettempdir()) / "minillm-tutorials")
DATA, RUN = WORK / "shakespeare-char", WORK / "char-model"
torch.manual_seed(0)

# %% [markdown]
# ## The data
#
# `minillm prepare` reads the built-in corpus (Shakespeare's plays, fetched once into
# `~/.cache/minillm`), builds a character tokenizer (tutorial 01) and writes the token ids as
# `train.bin` / `val.bin` (the last 10% of every play is held out for validation). We call the
# command-line entry point from Python; in a shell it is the same words.

# %%
assert minillm(["prepare", "--source", "shakespeare", "--tokenizer", "char", "--out", str(DATA)]) == 0
meta = json.loads((DATA / "meta.json").read_text())
print("vocab_size", meta["vocab_size"])

# %% [markdown]
# ## The loss by hand
#
# Logits `(B, T, V)`; the targets are the tokens shifted by one. Cross-entropy is
# `-log softmax(logits)[target]`, averaged.

# %%
model_config = dict(vocab_size=meta["vocab_size"], max_seq_len=64, d_model=64, n_layers=2, n_heads=4,
                    n_kv_heads=2, norm="rmsnorm", positions="rope", mlp="swiglu")
cfg = train_config_from_dict(dict(
    data_dir=str(DATA), out_dir=str(RUN), model=model_config,
    batch_size=16, block_size=64,  # 16 windows of 64 characters per step
    max_steps=500, lr=5e-3, min_lr=5e-4, schedule="wsd", decay_frac=0.5, warmup_steps=20,
    weight_decay=0.1, grad_clip=1.0, eval_interval=200, eval_batches=10, log_interval=10,
    dtype="float32", threads=1, seed=1))  # one thread: fastest for a model this small

model = Transformer(cfg.model)
ids = torch.randint(0, cfg.model.vocab_size, (2, 17))
x, y = ids[:, :-1], ids[:, 1:]  # inputs and next-token targets, (B, T) each
logits = model(x)  # (B, T, V)
by_hand = -F.log_softmax(logits, dim=-1).gather(-1, y[..., None]).mean()
assert_close(by_hand, next_token_loss(logits, y))
print(f"initial loss {by_hand.item():.3f}, ln(vocab_size) = {math.log(cfg.model.vocab_size):.3f}")

# %% [markdown]
# ## One AdamW step by hand
#
# AdamW (Loshchilov & Hutter 2019) keeps two running averages per weight: of the gradient `m`
# (momentum) and of its square `v` (a per-weight scale). The step is `m / sqrt(v)`: roughly the
# learning rate in size whatever the gradient's scale. Both averages start at zero, so early
# steps divide by `1 - β^t` to correct the bias. Weight decay shrinks the weight itself,
# separately from the gradient (the "W" in AdamW). The library uses `torch.optim.AdamW`
# (`make_optimizer`); we check the formula against it for three steps.

# %%
lr, (beta1, beta2), eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
w_lib = torch.randn(4, 3, requires_grad=True)
opt = torch.optim.AdamW([w_lib], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
w, m, v = w_lib.detach().clone(), torch.zeros(4, 3), torch.zeros(4, 3)
for t in range(1, 4):
    grad = torch.randn(4, 3)
    w_lib.grad = grad.clone()
    opt.step()
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    w = w - lr * wd * w  # decoupled weight decay
    w = w - lr * m_hat / (v_hat.sqrt() + eps)
assert_close(w, w_lib.detach())
print("AdamW by hand = torch.optim.AdamW after 3 steps")

# %% [markdown]
# Which weights decay: the matrices of attention and the MLP; not the embedding table, the norm
# gains or biases (`decay_split` in `optim.py`).

# %%
decay, no_decay = decay_split(model)
assert decay == [n for n, p in model.named_parameters() if p.dim() == 2 and n != "tok_emb.weight"]
print("no weight decay:", no_decay)

# %% [markdown]
# ## Train
#
# `Trainer` holds the model, optimizer and data; `train` runs the loop and writes a run directory
# (`config.json`, `tokenizer.json`, `model.safetensors`, `metrics.jsonl`, `loss.png`, ...). From a
# shell, the settings live in a TOML file: `minillm train --config configs/shakespeare-char-cpu.toml`
# trains `make demo`'s larger model the same way.
# The loop prints the step-0 loss next to `ln(vocab_size)`: a first sanity check.

# %%
shutil.rmtree(RUN, ignore_errors=True)  # a fresh run every time
summary = train(Trainer(cfg, quiet=True))
rows = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
train_losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
print(f"{summary['step']} steps in {summary['elapsed']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s")
print(f"train loss {train_losses[0]:.2f} -> {train_losses[-1]:.2f}; val loss {summary['val_loss']:.2f}")
assert train_losses[0] > math.log(cfg.model.vocab_size) - 0.3  # started at chance
assert summary["val_loss"] < train_losses[0] - 1.5  # and learned a lot

# %% [markdown]
# ## What it learned
#
# A 2-layer, 64-wide model after a few seconds knows the shape of a play: names in capitals,
# line breaks, common words. Sampling is the subject of tutorial 06.

# %%
model, tokenizer = load_model(RUN)
# context_overflow="slide": past the 64-token context, condition on the last 64 tokens
out = generate(model, tokenizer.encode("ROMEO:\n"), 200, temperature=0.8, seed=1, context_overflow="slide")
print("ROMEO:\n" + tokenizer.decode(out))

# %% [markdown]
# Longer training and bigger models do much better: `make demo` trains a 0.8M-parameter model for
# 4,000 steps (about 3.5 minutes on 2 cores, validation loss 1.48). Next: **06 · Sampling and the
# KV cache**.
