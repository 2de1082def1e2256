"""Helpers shared by the test modules (no test module imports another): hypothesis strategies and
seeded text for the tokenizer tests, and small PyTorch models for the model and generation tests.

Layout: tests/ holds the framework-free modules' tests, tests/torch/ and tests/jax/ the twins'."""

from __future__ import annotations

import os
import random
import unicodedata

from hypothesis import strategies as st

# Tests must be quiet and deterministic regardless of the machine's thread count.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- tokenizer inputs ------------------------------------------------------------------------------
# Pieces that stress tokenizers: emoji (incl. ZWJ sequences and skin tones), CJK, combining marks,
# control characters, CRLF, long whitespace runs, Unicode line separators.
TRICKY = [
    "🙂", "👨‍👩‍👧", "👍🏽", "🇫🇷", "中文字符", "日本語", "한국어", "e\u0301", "a\u0308\u0323", "\u0e01\u0e34",
    "\x00", "\x07", "\x1b[0m", "\x1c\x1d\x1e\x1f", "\x7f", "\x85", "\u00a0", "\u2028", "\u2029", "\ufeff",
    "\r\n", "\r", "\n\n\n", "\t\t", " " * 17, " \n ", "'s", "'LL", "123456", "<|eos|>", "<|user|>",
]  # fmt: skip

unicode_text = st.lists(
    st.one_of(
        # Assigned code points (no lone surrogates). Unassigned ones are left out because the
        # `regex` module (Unicode 17) and HF's Oniguruma (Unicode 16) classify the newest letters
        # differently, which changes pre-splitting; see minillm/tokenizer/hf.py.
        st.characters(exclude_categories=("Cs", "Cn")),
        st.sampled_from(TRICKY),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    ),
    max_size=40,
).map("".join)


def random_unicode(n_chars: int, seed: int) -> str:
    """Seeded text mixing ASCII words, whitespace, tricky pieces and arbitrary code points."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_chars):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(["the", "and", " of", "ab", "ba", "aaa", " ", "x"]))
        elif r < 0.5:
            out.append(rng.choice(TRICKY))
        elif r < 0.75:
            out.append(chr(rng.randrange(0x4E00, 0x4E80)))  # a few CJK ideographs, so pairs repeat
        else:
            c = chr(rng.randrange(0x110000))
            out.append(c if unicodedata.category(c) not in ("Cs", "Cn") else "?")  # as in unicode_text
    return "".join(out)


# --- small PyTorch models ------------------------------------------------------------------------------
GPT = dict(vocab_size=61, max_seq_len=48, d_model=32, n_layers=2, n_heads=4, bias=True)
LLAMA = dict(vocab_size=61, max_seq_len=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
             norm="rmsnorm", positions="rope", mlp="swiglu")
SINUS = dict(GPT, positions="sinusoidal", bias=False, n_kv_heads=1)
GELU_EXACT = dict(GPT, mlp="gelu_exact", bias=False)  # nanoGPT's MLP
STYLES = {"gpt2": GPT, "llama-gqa": LLAMA, "sinusoidal": SINUS, "gelu-exact": GELU_EXACT}


def make_model(style: str, seed: int = 0, scale: float = 5.0, **overrides):
    """A random model whose matrices are scaled up so that next-token distributions are peaked
    (random init gives near-ties that any rounding difference could flip)."""
    import torch

    from minillm.config import ModelConfig
    from minillm.torch.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**STYLES[style], **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def random_prompt(n: int, seed: int = 0, vocab: int = 61) -> list[int]:
    import torch

    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def perturbed_torch_model(config, scale: float = 0.1, seed: int = 0):
    """A PyTorch model whose every parameter (gains and biases too) is moved away from its init,
    so parity tests exercise every tensor; larger scales make greedy paths less trivial."""
    import torch

    from minillm.torch.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# --- training runs ---------------------------------------------------------------------------------------
def prepare_char_data(root, text: str):
    """A character-level data directory of `text` under root, as `minillm prepare` writes it."""
    from minillm.cli import main as cli

    (root / "corpus.txt").write_text(text, encoding="utf-8")
    assert cli(["prepare", "--source", str(root / "corpus.txt"), "--tokenizer", "char", "--out",
                str(root / "char")]) == 0
    return root / "char"


def train_cmd(config, *extra: str) -> list[str]:
    """`minillm train --config config --quiet ...` as a command for a subprocess."""
    import sys

    return [sys.executable, "-m", "minillm.cli", "train", "--config", str(config), "--quiet", *extra]


def train_losses(run) -> dict[int, float]:
    """step -> train loss, from a run directory's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if r.get("train_loss") is not None}



def kill_at_first_checkpoint(procs: dict, states: dict, timeout: float = 120.0) -> None:
    """SIGKILL each training process procs[key] as soon as its first resume point states[key] (a
    trainer_state.json path) exists, or when it exits; none is left running whatever happens."""
    import time

    running, deadline = dict(procs), time.time() + timeout
    try:
        while running and time.time() < deadline:
            for key, proc in list(running.items()):
                if states[key].exists() or proc.poll() is not None:
                    proc.kill()  # the kill under test
                    del running[key]
            time.sleep(0.002)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
