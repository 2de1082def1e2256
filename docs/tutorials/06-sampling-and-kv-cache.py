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
# # 06 · Sampling and the KV cache: turning a model into a writer
#
# The model gives, at the last position, a score (logit) for every possible next token. To write
# text we pick one, append it, and ask again. *How* we pick decides the style: always the best
# (greedy: safe, repetitive), or a random draw from the distribution, usually after trimming its
# unlikely tail. The filters live in `src/minillm/torch/sampling.py`, the loop in
# `src/minillm/torch/generate.py`, the cache in `src/minillm/torch/kv_cache.py`.
#
# We use the model trained in tutorial 05 (this runs tutorial 05 first if its run is missing).

# %%
import json
import os
import runpy
import tempfile
import time
from pathlib import Path

import torch
from torch.testing import assert_close

from minillm.torch.generate import generate
from minillm.torch.kv_cache import make_caches
from minillm.torch.model import load_model
from minillm.torch.sampling import apply_temperature, top_k_filter, top_p_filter

WORK = Path(os.environ.get("MINILLM_TUTORIAL_DIR") or Path(tempfile.gettempdir()) / "minillm-tutorials")
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder


def complete(run: Path) -> bool:
    """Whether `run` is a finished run directory (its last checkpoint is at its max_steps)."""
    state, config = run / "trainer_state.json", run / "config.json"
    return state.is_file() and config.is_file() and (
        json.loads(state.read_text())["step"] == json.loads(config.read_text())["train"]["max_steps"])


if not complete(WORK / "char-model"):
    runpy.run_path(str(HERE / "05-training.py"), run_name="__main__")
model, tokenizer = load_model(WORK / "char-model")
torch.set_num_threads(1)

prompt = tokenizer.encode("JULIET:\nWherefore art thou")  # 26 of the 64 tokens of context
with torch.no_grad():
    logits = model(torch.tensor([prompt]))[:, -1]  # (1, V): the scores for the next character
probs = logits.softmax(-1)[0]
best = probs.argsort(descending=True)[:8]
print("most likely next characters:", [(tokenizer.decode([int(i)]), round(float(probs[i]), 3)) for i in best])

# %% [markdown]
# ## Temperature, top-k and top-p by hand
#
# - **temperature** `T` divides the logits: `T < 1` sharpens the distribution, `T > 1` flattens it;
# - **top-k** (Fan et al. 2018) keeps the `k` most likely tokens;
# - **top-p** or nucleus (Holtzman et al. 2020) keeps the smallest set of most likely tokens whose
#   probabilities add up to `p`: few tokens when the model is sure, many when it is not.
#
# A filter sets the logits of ruled-out tokens to `-inf`, so the softmax gives them probability 0
# and the survivors keep their relative odds.

# %%
def temperature_by_hand(logits, t):
    return logits / t


def top_k_by_hand(logits, k):
    kth_best = logits.sort(descending=True).values[..., k - 1 : k]  # (1, 1)
    return logits.masked_fill(logits < kth_best, float("-inf"))


def top_p_by_hand(logits, p):
    out = torch.full_like(logits, float("-inf"))
    probs = logits.softmax(-1)[0]
    mass = 0.0
    for i in probs.argsort(descending=True).tolist():  # most likely first
        if mass >= p:  # the tokens kept so far already reach p
            break
        out[0, i] = logits[0, i]
        mass += float(probs[i])
    return out


for t in (0.5, 1.5):
    assert_close(temperature_by_hand(logits, t), apply_temperature(logits, t))
assert torch.equal(top_k_by_hand(logits, 5), top_k_filter(logits, 5))
for p in (0.5, 0.9):
    assert torch.equal(top_p_by_hand(logits, p), top_p_filter(logits, p))
    kept = torch.isfinite(top_p_filter(logits, p)[0]).nonzero()[:, 0]
    print(f"top-p {p}: {len(kept)} tokens survive:", [tokenizer.decode([int(i)]) for i in kept])
for t in (0.5, 1.0, 1.5):
    print(f"temperature {t}: p(best) = {apply_temperature(logits, t).softmax(-1).max():.2f}")

# %% [markdown]
# `generate` applies the filters in Hugging Face's order (temperature, top-k, top-p, min-p) and
# draws with `torch.multinomial`; a `seed` makes the draw repeatable. Greedy decoding is
# `temperature=0`.

# %%
for settings in (dict(temperature=0), dict(temperature=0.8, top_k=10), dict(temperature=1.0, top_p=0.9)):
    out = generate(model, prompt, 30, seed=1, **settings)
    print(f"{str(settings):40s}", repr(tokenizer.decode(out)))

# %% [markdown]
# ## The KV cache
#
# Without a cache, every new token reruns the model over the whole text so far: `n` tokens cost
# `O(n²)` token-passes. But in causal attention the keys and values of earlier tokens never change
# (tutorial 03: a later token cannot affect them). So each layer keeps them, and a new token only
# computes its own query, key and value and attends to the cached ones.
#
# First by hand with the library's cache objects: fill the caches with the prompt (the *prefill*),
# then feed one token at a time at its position. Every step's logits must equal those of a full
# forward pass over the same text.

# %%
ids = torch.tensor([prompt])  # (1, T)
T = ids.size(1)
with torch.no_grad():
    full = model(ids)  # (1, T, V): every position, no cache
    caches = make_caches(model.config, batch=1, max_len=T)  # one K/V buffer per layer
    prefix = 10
    steps = [model(ids[:, :prefix], torch.arange(prefix), kv_caches=caches)]  # prefill: positions 0..9
    for pos in range(prefix, T):  # decode: one token, its position, the caches grow by one
        steps.append(model(ids[:, pos : pos + 1], torch.tensor([pos]), kv_caches=caches))
assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
print(f"cached decoding = full forward at all {T} positions; cache of layer 0: {tuple(caches[0].k.shape)}")

# %% [markdown]
# Then against the library's generation loop, which prefills once and decodes with a cache (on a
# packed copy of the weights, `src/minillm/torch/packed.py`). Greedy decoding must give the same
# tokens as the slow loop that reruns the model on the whole text every step.

# %%
def generate_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


n_new = model.config.max_seq_len - len(prompt)  # fill the 64-token context
start = time.perf_counter()
slow = generate_without_cache(model, prompt, n_new)
middle = time.perf_counter()
fast = generate(model, prompt, n_new, temperature=0)
end = time.perf_counter()
assert fast == slow
print(f"{n_new} tokens: {1e3 * (middle - start) / n_new:.1f} ms/token without a cache, "
      f"{1e3 * (end - middle) / n_new:.1f} ms/token with one (both greedy, same text)")

# %% [markdown]
# At this tiny size and 64 tokens of context the cache saves little; the saving grows with the
# length of the text and the size of the model (the docs' KV-cache page plots it). `minillm
# sample --run RUN --prompt "..."` is this loop on the command line. Next: **07 · Fine-tuning**.
