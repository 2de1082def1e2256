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
# # 08 · Chat with your fine-tuned model
#
# A chat is text generation with a protocol: the conversation so far is rendered by the same
# template the model was fine-tuned on, followed by the assistant's turn opener, and the model
# writes until it emits the end-of-turn token. Everything here is in
# `src/minillm/tokenizer/chat.py` (the template), `src/minillm/torch/generate.py` (the loop) and
# `src/minillm/commands/chat.py` (`minillm chat`). We talk to the LoRA model of tutorial 07 (run
# first if missing).

# %%
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from minillm.commands.chat import Conversation
from minillm.tokenizer import chat
from minillm.torch.generate import generate, stream_text
from minillm.torch.sft import load_for_inference

WORK = Path(os.environ.get("MINILLM_TUTORIAL_DIR") or Path(tempfile.gettempdir()) / "minillm-tutorials")
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
RUN = WORK / "plays-lora"


def complete(run: Path) -> bool:
    """Whether `run` is a finished run directory (its last checkpoint is at its max_steps)."""
    state, config = run / "trainer_state.json", run / "config.json"
    return state.is_file() and config.is_file() and (
        json.loads(state.read_text())["step"] == json.loads(config.read_text())["train"]["max_steps"])


if not complete(RUN):
    runpy.run_path(str(HERE / "07-fine-tuning.py"), run_name="__main__")
model, tokenizer = load_for_inference(RUN)  # the base with the adapter merged in
torch.set_num_threads(1)

# %% [markdown]
# ## The chat template by hand
#
# Special tokens mark the structure: `<|bos|>` once, then for each message its role token, its
# content as ordinary text, and `<|eos|>`; to ask for a reply, `<|assistant|>`. A user who types
# "<|eos|>" gets those characters, not the token: content is always encoded as text.

# %%
special = tokenizer.special_id  # name -> id, e.g. special("eos")
messages = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "In which play is Iago?"}]

by_hand = [special("bos")]
for m in messages:
    by_hand += [special(m["role"])] + tokenizer.encode(m["content"]) + [special("eos")]
by_hand += [special("assistant")]  # the generation prompt
assert by_hand == chat.render(tokenizer, messages, add_generation_prompt=True)
print(tokenizer.decode(by_hand))

# %% [markdown]
# ## A reply through the Python API
#
# The reply ends at a stop token: `<|eos|>`, or any other template token (a model that starts a
# new turn is done). Greedy decoding (`temperature=0`) gives the answer the model finds most likely.

# %%
stop = chat.stop_token_ids(tokenizer)
question = [{"role": "user", "content": "In which play is Iago?"}]
prompt = chat.render(tokenizer, question, add_generation_prompt=True)
reply_ids = generate(model, prompt, 20, temperature=0, stop_token_ids=stop)
assert reply_ids[-1] == special("eos")  # it learned to stop
reply = tokenizer.decode(reply_ids[:-1])
print("you>  ", question[0]["content"])
print("model>", reply)
assert reply == "Othello."  # a fact it was fine-tuned on

# %% [markdown]
# A chat shows the reply as it is produced: `stream_text` yields text pieces (never half a
# character) and leaves out the stop token.

# %%
pieces = list(stream_text(model, tokenizer, prompt, 20, temperature=0, stop_token_ids=stop))
print(pieces)
assert "".join(pieces) == reply

# %% [markdown]
# ## A conversation
#
# `minillm chat` keeps the messages and re-renders the whole conversation each turn. This model
# has a context of only 64 tokens, so the `Conversation` drops the oldest exchanges when the next
# prompt and its reply would not fit.

# %%
conv = Conversation(tokenizer, model.config.max_seq_len)
for text in ("In which play is Prospero?", "In which play is Tybalt?", "In which play is Cordelia?"):
    ids = conv.prompt(text, reserve=20)  # the conversation that fits, + this turn, + <|assistant|>
    out = generate(model, ids, 20, temperature=0, stop_token_ids=stop)
    conv.add_reply(tokenizer.decode([t for t in out if t not in stop]))
    print(f"you> {text}\nmodel> {conv.turns[-1]['content']}   ({len(ids)} prompt tokens)")
assert len(ids) <= model.config.max_seq_len - 20

# %% [markdown]
# ## The same from the command line
#
# `minillm chat --run DIR` is this loop with a terminal around it (`/reset`, `/exit`).

# %%
result = subprocess.run([sys.executable, "-m", "minillm.cli", "chat", "--run", str(RUN), "--temperature", "0",
                         "--threads", "1"], input="In which play is Iago?\n/exit\n", capture_output=True,
                        text=True, timeout=120, check=True)
print(result.stdout)
assert "model> Othello." in result.stdout

# %% [markdown]
# That is the whole path: characters and merges (01), vectors and positions (02), attention (03),
# blocks (04), training (05), sampling (06), fine-tuning (07) and chat (08). To go further:
# `minillm export` hands a model to Hugging Face `transformers` or llama.cpp, and the docs site
# has a page per concept.
