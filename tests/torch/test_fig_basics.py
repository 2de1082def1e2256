"""The formula figures (minillm.viz.fig_basics, fig_training): each figure's numbers against an
independent reference (float64 formulas, literal values), then every figure drawn into a PNG from
the tiny char run of conftest's `env`."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from minillm.viz import fig_basics, fig_training
from minillm.viz.figures import FigureContext
from tests.torch.conftest import CORPUS

GPT2_PARAMETERS = 124_439_808  # OpenAI's GPT-2 small, embeddings tied


def test_rope_score_is_the_rotation_formula_and_depends_only_on_the_offset():
    head_dim, T = 16, 48
    numbers = fig_basics.rope_numbers(head_dim, T)
    half = head_dim // 2
    q, k = numbers["q"].astype(np.float64), numbers["k"].astype(np.float64)
    theta = 10000.0 ** (-2 * np.arange(half) / head_dim)  # (hd/2,)
    # Pair i as a complex number; RoPE multiplies it by e^(i p θ_i), and u·v = Re(u conj(v)).
    zq, zk = q[:half] + 1j * q[half:], k[:half] + 1j * k[half:]
    offset = np.arange(T)[:, None] - np.arange(T)[None, :]  # (m, n): m - n
    expected = np.real((zq * zk.conj() * np.exp(1j * offset[..., None] * theta)).sum(-1))
    np.testing.assert_allclose(numbers["scores"], expected, atol=1e-4)
    for d in range(1, 10):  # along each diagonal m - n = d the score is one number
        diagonal = np.diagonal(numbers["scores"], offset=-d)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4)
    radius = np.hypot(numbers["rotated_x"][:, :half], numbers["rotated_x"][:, half:])  # (T, hd/2)
    np.testing.assert_allclose(radius, np.broadcast_to(1 + np.arange(half) / 2, radius.shape), rtol=1e-5)


def test_alibi_slopes_are_the_papers_geometric_sequence():
    numbers = fig_basics.alibi_numbers(n_heads=8, T=16)
    np.testing.assert_allclose(numbers["slopes"], [2.0 ** (-8 * h / 8) for h in range(1, 9)])
    assert numbers["slopes"][0] == 0.5 and numbers["slopes"][-1] == 1 / 256
    i, j = np.arange(16)[:, None], np.arange(16)[None, :]
    for h, m in enumerate(numbers["slopes"]):
        expected = np.where(j <= i, -m * (i - j), -np.inf)
        np.testing.assert_allclose(numbers["bias"][h], expected, rtol=1e-6)


def test_masks_match_the_rules_written_out():
    numbers = fig_basics.mask_numbers(T=12, window=4, new=4)
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    np.testing.assert_array_equal(numbers["causal"], j <= i)
    np.testing.assert_array_equal(numbers["window"], (j <= i) & (i - j < 4))
    np.testing.assert_array_equal(numbers["cached"], j <= np.arange(8, 12)[:, None])  # queries 8..11


def test_bpe_merges_of_a_hand_counted_text():
    # chunks "ab", " ab" x3, " cd": (a, b) is the most frequent pair (4), then (" ", ab) (3)
    numbers = fig_basics.bpe_numbers("ab ab ab ab cd", n_merges=2)
    assert numbers["top"][:2] == [("a", "b", "ab"), (" ", "ab", " ab")]
    assert numbers["merges"] == [0, 1, 2] and numbers["n_bytes"] == 14
    assert numbers["tokens_per_byte"] == [14 / 14, 10 / 14, 7 / 14]


def test_bpe_tokens_per_byte_falls_with_every_merge():
    numbers = fig_basics.bpe_numbers(CORPUS[:4000], n_merges=64)
    per_byte = numbers["tokens_per_byte"]
    assert per_byte[0] == 1.0 and numbers["merges"][-1] == 64  # ASCII: one byte, one token
    assert all(later < earlier for earlier, later in zip(per_byte, per_byte[1:])), per_byte
    assert len(numbers["top"]) == 20 and all(left + right == merged for left, right, merged in numbers["top"])


def test_schedule_numbers_match_the_formulas():
    numbers = fig_training.schedule_numbers(max_steps=1000, warmup_steps=50)
    cosine, wsd, constant = (numbers["lrs"][k] for k in ("cosine", "wsd", "constant"))
    assert cosine[0] == pytest.approx(1e-3 / 51) and cosine[50] == pytest.approx(1e-3)
    assert cosine[525] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 2)))
    assert cosine[1000] == pytest.approx(1e-4)
    assert wsd[799] == pytest.approx(1e-3) and wsd[900] == pytest.approx(5.5e-4)
    assert wsd[1000] == pytest.approx(1e-4)
    assert all(lr == pytest.approx(1e-3) for lr in constant[50:])
    for seconds, lrs in numbers["by_time"].values():  # the decay spans the last 20% of the 60 s
        at = dict(zip(np.round(seconds, 2), lrs))
        assert at[30.0] == pytest.approx(1e-3) and at[54.0] == pytest.approx(5.5e-4)
        assert lrs[-1] == pytest.approx(1e-4)


def test_dpo_numbers_are_the_sigmoid_loss_and_its_weight():
    margins = np.linspace(-6, 6, 13)
    numbers = fig_training.dpo_numbers(betas=(0.1, 2.0), margins=margins)
    for beta in (0.1, 2.0):
        np.testing.assert_allclose(numbers["losses"][beta], np.log1p(np.exp(-beta * margins)), rtol=1e-6)
        np.testing.assert_allclose(numbers["weights"][beta], 1 / (1 + np.exp(beta * margins)), rtol=1e-6)


def test_params_and_flops_of_gpt2_small():
    numbers = fig_training.params_flops_numbers("gpt2-small")
    D, L, V, T, F = 768, 12, 50257, 1024, 3072
    assert numbers["params"] == {"embeddings": V * D + T * D, "attention": L * (4 * D * D + 4 * D),
                                 "MLP": L * (2 * D * F + F + D), "norms": (2 * L + 1) * 2 * D, "lm_head": 0}
    assert sum(numbers["params"].values()) == GPT2_PARAMETERS
    assert numbers["flops"]["attention (scores)"] == 12 * L * D * T
    assert sum(numbers["flops"].values()) == 6 * (GPT2_PARAMETERS - T * D) + 12 * L * D * T
    untied = fig_training.params_flops_numbers("llama-40m")["params"]
    assert untied["lm_head"] == 8192 * 512 and untied["embeddings"] == 8192 * 512


def test_memory_numbers_ddp_replicates_and_fsdp_shards():
    numbers = fig_training.memory_numbers("gpt2-small", worlds=(1, 2, 4, 8), batch_size=16, block_size=1024)
    ddp, fsdp = numbers["memory"]["ddp"], numbers["memory"]["fsdp"]
    for w, (d, _), (f, _) in zip((1, 2, 4, 8), ddp, fsdp):
        assert d["weights"] == 4 * GPT2_PARAMETERS and d["optimizer"] == 8 * GPT2_PARAMETERS
        assert f["optimizer"] == 8 * GPT2_PARAMETERS // w  # AdamW's two moments, sharded
        assert d["activations"] == f["activations"] == ddp[0][0]["activations"] // w  # micro-batch 16 / w
    assert all(d_peak > f_peak for (_, d_peak), (_, f_peak) in zip(ddp[1:], fsdp[1:]))


def test_sampling_survivors_match_a_hand_computation(env):
    logits, _ = fig_training.next_token_logits(env["base"], fig_training.QUICK_PROMPT)
    numbers = fig_training.sampling_numbers(logits)
    p = torch.softmax(logits.double(), dim=-1).numpy()
    order = np.argsort(-p)
    assert p[order[4]] > p[order[5]]  # no tie at the k-th: the top-5 set is unambiguous
    cumulative = np.cumsum(p[order])
    nucleus = order[: int(np.searchsorted(cumulative, 0.9)) + 1]  # smallest prefix reaching 0.9
    for name, kept in (("top-k 5", order[:5]), ("top-p 0.9", nucleus), ("temperature 1", order)):
        assert set(np.flatnonzero(numbers[name] > 0)) == set(kept.tolist()), name
        np.testing.assert_allclose(numbers[name][kept], p[kept] / p[kept].sum(), rtol=1e-4, atol=1e-7)
    for t in (0.5, 1.5):  # softmax(z / T) = p^(1/T), renormalised
        np.testing.assert_allclose(numbers[f"temperature {t}"], p ** (1 / t) / (p ** (1 / t)).sum(),
                                   rtol=1e-4, atol=1e-7)


def test_every_figure_writes_a_png(env, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    work = tmp_path / "work"
    shutil.copytree(env["base"], work / "model")
    shutil.copytree(env["data"], work / "data")
    ctx = FigureContext(out=tmp_path / "out", work=work, quick=True)
    figures = {**fig_basics.FIGURES, **fig_training.FIGURES}
    assert sorted(figures) == sorted(["bpe-merges.png", "positions.png", "rope-rotation.png",
                                      "alibi-bias.png", "masks.png", "lr-schedules.png", "sampling.png",
                                      "params-flops.png", "dpo-loss.png", "memory-per-rank.png"])
    for name, draw in figures.items():
        draw(ctx)
        png = (tmp_path / "out" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(figures)  # no temp file left
