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
# # 07 · Fine-tuning: teaching the model to answer
#
# A pretrained model continues text. To make it *answer*, we fine-tune it on conversations: a
# user turn and the assistant's reply, rendered with a **chat template**, with the loss on the
# reply alone (supervised fine-tuning, SFT). Full fine-tuning updates every weight; **LoRA**
# (Hu et al. 2021) freezes them and learns a small low-rank correction instead:
#
#     y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ        A: (r, in), B: (out, r), r small
#
# `B` starts at zero, so training starts from the base model exactly. Only `A` and `B` train:
# a fraction of the parameters, and the optimizer's state shrinks with them. LoRA is in
# `src/minillm/torch/lora.py`, the template in `src/minillm/tokenizer/chat.py`, the SFT trainer in
# `src/minillm/torch/sft.py`. The base is the model of tutorial 05 (run first if missing).

# %%
import json
import os
import runpy
import shutil
import tempfile
from pathlib import Path

import torch
from torch.testing import assert_close

from minillm.finetune import finetune_configs
from minillm.tokenizer import chat
from minillm.torch import lora
from minillm.torch.generate import generate
from minillm.torch.model import load_model
from minillm.torch.sft import FinetuneTrainer, load_for_inference
from minillm.train_loop import train

WORK = Path(os.environ.get("MINILLM_TUTORIAL_DIR") or Path(tempfile.gettempdir()) / "minillm-tutorials")
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
BASE, OUT = WORK / "char-model", WORK / "plays-lora"


def complete(run: Path) -> bool:
    """Whether `run` is a finished run directory (its last checkpoint is at its max_steps)."""
    state, config = run / "trainer_state.json", run / "config.json"
    return state.is_file() and config.is_file() and (
        json.loads(state.read_text())["step"] == json.loads(config.read_text())["train"]["max_steps"])


if not complete(BASE):
    runpy.run_path(str(HERE / "05-training.py"), run_name="__main__")
model, tokenizer = load_model(BASE)
torch.manual_seed(0)

# %% [markdown]
# ## LoRA on one linear layer, by hand
#
# `add_lora` swaps the chosen linear layers of every block for a `LoRALinear` that keeps the base
# weight and adds the adapter. We take the query projection of block 0.

# %%
lora.add_lora(model, rank=4, alpha=8.0, targets=("q", "v"))
layer = model.blocks[0].attn.q  # a LoRALinear now
A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
x = torch.randn(5, layer.in_features)
with torch.no_grad():
    assert_close(layer(x), x @ layer.weight.T)  # B = 0: exactly the base layer
    B.normal_()  # pretend training moved B
    by_hand = x @ layer.weight.T + (8.0 / 4) * (x @ A.T) @ B.T
    assert_close(layer(x), by_hand)
    # After training the update can be folded into W: no extra cost at inference.
    merged_weight = layer.weight + (8.0 / 4) * B @ A  # (out, in)
    assert_close(x @ merged_weight.T, by_hand)
    B.zero_()
print("LoRALinear = x Wᵀ + (alpha/r) x Aᵀ Bᵀ; A", tuple(A.shape), "B", tuple(B.shape))

# %% [markdown]
# Only the adapters train. Each adapted layer adds `r · (in + out)` parameters:

# %%
trainable = lora.freeze_base(model)
by_hand = sum(4 * (m.in_features + m.out_features) for m in lora.lora_layers(model).values())
assert trainable == by_hand == sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"{trainable:,} trainable of {model.num_parameters():,} parameters")

# %% [markdown]
# ## The data: conversations, and what is trained
#
# A small set of facts the base model has never been asked: which play a character is in. Each
# line of the JSONL file is a prompt and its completion (a user turn and the assistant's reply).

# %%
PLAYS = {"Hamlet": "Ophelia Horatio Laertes Polonius", "Macbeth": "Banquo Duncan Macduff Malcolm",
         "Othello": "Iago Desdemona Cassio Emilia", "King Lear": "Cordelia Goneril Regan Edgar",
         "The Tempest": "Prospero Miranda Ariel Caliban", "Twelfth Night": "Viola Olivia Malvolio Orsino",
         "Romeo and Juliet": "Tybalt Mercutio Benvolio Juliet"}
examples = [{"prompt": f"In which play is {name}?", "completion": f"{play}."}
            for play, names in PLAYS.items() for name in names.split()]
data = WORK / "plays.jsonl"
data.write_text("".join(json.dumps(e) + "\n" for e in examples))

# %% [markdown]
# The template renders `<|bos|> <|user|> question <|eos|> <|assistant|> answer <|eos|>`. The loss
# counts only the answer and its closing `<|eos|>` (marked `^` below): the model learns to answer
# and to stop, not to write questions. Tutorial 08 builds the template by hand.

# %%
messages = [{"role": "user", "content": examples[0]["prompt"]},
            {"role": "assistant", "content": examples[0]["completion"]}]
ids, trained = chat.render_for_training(tokenizer, messages)
pieces = [tokenizer.decode([i]) for i in ids]
print("".join(pieces))
print("".join(("^" if t else " ") * len(p) for p, t in zip(pieces, trained)))
assert "".join(p for p, t in zip(pieces, trained) if t) == "Hamlet.<|eos|>"

# %% [markdown]
# ## A short SFT run
#
# `finetune_configs` makes the run's settings from the base run (its model config, its tokenizer)
# and `--set`-style overrides; `FinetuneTrainer` is the pretraining trainer with the data, the model
# and the saved weights swapped (only the adapter is saved). Every 7th example is held out to
# measure the validation loss. From a shell: `minillm finetune --run BASE --data plays.jsonl
# --method lora --out OUT --set max_steps=300 ...`.

# %%
settings = ["max_steps=300", "lr=1e-2", "min_lr=1e-3", "warmup_steps=10", "lora_rank=8", "val_every=7",
            "batch_size=12",  # 24 training examples: two full batches per epoch
            "eval_interval=0", "log_interval=10", "dtype=float32", "threads=1"]
cfg, ft = finetune_configs(str(BASE), str(data), str(OUT), "lora", settings)
shutil.rmtree(OUT, ignore_errors=True)
summary = train(FinetuneTrainer(cfg, ft, quiet=True))
rows = [json.loads(line) for line in (OUT / "metrics.jsonl").read_text().splitlines()]
losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
print(f"answer loss {losses[0]:.2f} -> {losses[-1]:.2f} in {summary['elapsed']:.0f} s")
assert losses[-1] < losses[0] / 3
print(sorted(p.name for p in OUT.iterdir()))

# %% [markdown]
# ## Before and after
#
# `load_for_inference` loads a LoRA run as its base with the adapter merged in. The base model
# continues the text like a play; the fine-tuned one answers, and knows the 24 facts it was
# trained on. The 4 held-out questions show what 24 examples cannot teach: it answers with a
# play, but guesses.

# %%
tuned, _ = load_for_inference(OUT)
base_model, _ = load_model(BASE)
stop = chat.stop_token_ids(tokenizer)


def answer(model, question: str) -> str:
    prompt = chat.render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    reply = generate(model, prompt, 20, temperature=0, stop_token_ids=stop)
    return tokenizer.decode([t for t in reply if t not in stop])


print("base: ", repr(answer(base_model, "In which play is Ophelia?")))
held_out = examples[ft.val_every - 1 :: ft.val_every]
right = [answer(tuned, e["prompt"]) == e["completion"] for e in examples if e not in held_out]
print(f"fine-tuned: {sum(right)} of {len(right)} training questions answered exactly")
for e in held_out:
    print(f"  held out: {e['prompt']!r} -> {answer(tuned, e['prompt'])!r} (truth: {e['completion']!r})")
assert sum(right) >= 0.8 * len(right)

# %% [markdown]
# A real fine-tune uses thousands of examples so the model learns a *skill* rather than a list:
# `make finetune-demo` fine-tunes a BPE model on the built-in Shakespeare task set. Next:
# **08 · Chat**, talking to this model.
