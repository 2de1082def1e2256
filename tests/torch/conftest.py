"""Fixtures of the fine-tuning tests (test_finetune.py, test_finetune_use.py): one tiny char-level
base run (max_seq_len 256), a small chat JSONL, and LoRA / full fine-tunes of the base, made once
per session."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from minillm.cli import main as cli
from tests.conftest import prepare_char_data

NAMES, THINGS, PLACES = ("Anne", "Bob", "Cleo"), ("sea", "hill", "moon"), ("gate", "tower", "river", "bridge")


def chat_turns(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# 24 examples: 21 prompt/completion pairs, 3 multi-turn conversations with a system turn
EXAMPLES = ([{"prompt": f"Where does {a} see the {b}?", "completion": f"By the {PLACES[(i + j) % 4]}."}
             for i, a in enumerate(NAMES) for j, b in enumerate(THINGS)]
            + [{"prompt": f"What does {a} see by the {c}?", "completion": f"The {THINGS[(i + j) % 3]}."}
               for i, a in enumerate(NAMES) for j, c in enumerate(PLACES)]
            + [{"messages": [{"role": "system", "content": "Answer briefly."},
                             *chat_turns(f"Who sees the {b}?", a), *chat_turns("Where?", f"By the {c}.")]}
               for a, b, c in zip(NAMES, THINGS, PLACES)])
# The corpus holds every character of the chat data, so the char tokenizer can encode it.
CORPUS = ("".join(f"{a} sees {b} by the {c}.\n" for a in NAMES for b in THINGS for c in PLACES)
          + "".join(json.dumps(e) + "\n" for e in EXAMPLES)) * 2
BASE = dict(batch_size=8, block_size=32, max_steps=30, lr=1e-2, warmup_steps=2, eval_interval=0,
            eval_batches=1, seed=1, dtype="float32", threads=1)
BASE_MODEL = dict(max_seq_len=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, norm="rmsnorm",
                  positions="rope", mlp="swiglu")
# Fine-tuning settings of every run: small, float32 (dtype "auto" may pick bf16 autocast), one
# thread (on a busy 2-core machine two threads per step wait on each other: ~10x slower).
FAST = ["dtype=float32", "threads=1", "block_size=96", "batch_size=4", "eval_interval=0", "eval_batches=1",
        "warmup_steps=2", "log_interval=1", f"val_every={len(EXAMPLES)}"]


def finetune_args(base: Path, data: Path, out: Path, method: str, *pairs: str) -> list[str]:
    sets = [arg for pair in (*FAST, *pairs) for arg in ("--set", pair)]
    return ["finetune", "--run", str(base), "--data", str(data), "--method", method, "--out", str(out),
            "--quiet", *sets]


def digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _keep_thread_count():
    """The runs here set torch's thread count (threads=1) in this process: put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """A base run (30 steps of pretraining), the chat JSONL, and LoRA / full fine-tunes of the base."""
    root = tmp_path_factory.mktemp("finetune")
    data = prepare_char_data(root, CORPUS)
    top = {**BASE, "data_dir": str(data), "out_dir": str(root / "base")}
    toml = [f"{k} = {json.dumps(v)}" for k, v in top.items()] + ["[model]"] \
        + [f"{k} = {json.dumps(v)}" for k, v in BASE_MODEL.items()]
    (root / "base.toml").write_text("\n".join(toml) + "\n")
    assert cli(["train", "--config", str(root / "base.toml"), "--quiet"]) == 0
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    before = digests(root / "base")
    for method, steps in (("lora", 15), ("full", 60)):  # full: long enough to answer briefly, then eos
        assert cli(finetune_args(root / "base", chat, root / method, method, f"max_steps={steps}",
                                  "lr=1e-2", "min_lr=1e-3")) == 0
    return dict(root=root, data=data, base=root / "base", chat=chat, lora=root / "lora", full=root / "full",
                basedigests=before)

def hand_render(tokenizer, messages: list[dict], generation_prompt: bool = False):
    """The template's documented layout written out: <|bos|>, then <|role|> content <|eos|> per
    message; trained = each assistant turn's content and its eos. Returns (ids, trained)."""
    special = tokenizer.special_id
    ids, trained = [special("bos")], [False]
    for m in messages:
        piece = [special(m["role"])] + tokenizer.encode(m["content"]) + [special("eos")]
        ids += piece
        trained += [False] + [m["role"] == "assistant"] * (len(piece) - 1)
    if generation_prompt:
        ids, trained = ids + [special("assistant")], trained + [False]
    return ids, trained

def one_line_error(capsys, args: list[str], *needles: str) -> None:
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minillm {args[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(n in err for n in needles), err
