"""GRPO (minillm.torch.grpo, torch/grpo_train.py): the maths against float64 references and a
hand-worked example, sampling a group as training rows, and runs of the trainer (reproducible,
exact resume after SIGKILL, LoRA and full weights) on the tiny SFT runs of conftest's `env`."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm import align, train_loop
from minillm.data import tasks
from minillm.data.rewards import partial
from minillm.tokenizer import chat
from minillm.torch import lora
from minillm.torch.grpo import collate, group_advantages, grpo_loss, k3_kl, sample_groups
from minillm.torch.grpo_train import GRPOTrainer
from minillm.torch.logprobs import token_logprobs
from minillm.torch.sft import load_for_inference
from tests.conftest import kill_at_first_checkpoint, make_model
from tests.torch.conftest import digests


# --- 1. advantages ------------------------------------------------------------------------------------
def test_group_advantages_equal_a_float64_reference():
    rewards = np.random.default_rng(0).random((5, 6))
    rewards[1, :3] = 1.0  # ties inside a group are fine
    expected = np.empty_like(rewards)
    for p, row in enumerate(rewards):  # population std (divide by G), eps 1e-4
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        expected[p] = [(r - mean) / (std + 1e-4) for r in row]
    got = group_advantages(torch.from_numpy(rewards))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.sum(dim=-1).numpy(), 0.0, atol=1e-12)  # the group is the baseline


def test_all_equal_rewards_give_exactly_zero_advantages():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           dtype=torch.float64)  # 0.1 * 3 / 3 != 0.1 in floating point
    got = group_advantages(rewards)
    assert torch.equal(got[:3], torch.zeros(3, 3, dtype=torch.float64))
    assert got[3].abs().min() > 0.5  # the group with a spread keeps its signal


def test_all_equal_rewards_give_zero_policy_gradient():
    """Through a real model: with every group's rewards equal and kl_coef = 0, no parameter gets a
    gradient, whatever the ratios; with a spread of rewards, they do."""
    model = make_model("llama-gqa", scale=1.0).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 61, (4, 12), generator=g)
    y = torch.cat([x[:, 1:], torch.randint(0, 61, (4, 1), generator=g)], dim=1)
    y[:, :5] = -100  # the prompt
    mask = y != -100
    for rewards, moves in (([[1.0, 1.0], [0.3, 0.3]], False), ([[1.0, 0.0], [0.3, 0.3]], True)):
        model.zero_grad()
        logp = token_logprobs(model, x, y)
        old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g)  # ratios far from 1, some clipped
        advantages = group_advantages(torch.tensor(rewards)).flatten()
        loss, _ = grpo_loss(logp, old, logp.detach(), advantages, mask, clip_eps=0.2, kl_coef=0.0)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) == len(list(model.parameters()))
        if moves:
            assert any(gr.abs().max() > 0 for gr in grads)
        else:
            assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)


# --- 2. the clipped objective, by hand ------------------------------------------------------------------
def test_clipped_objective_matches_a_hand_computed_example():
    """clip_eps 0.2: ratios are clipped to [0.8, 1.2]. old_logp = 0, so ratio = exp(logp).
    Sequence 0, A = +1, three tokens:
        ratio 1.5: min(1.5 * 1, 1.2 * 1) = 1.2   clipped above (the clip binds: no gradient)
        ratio 0.5: min(0.5 * 1, 0.8 * 1) = 0.5   unclipped (the ratio term is the smaller)
        ratio 1.1: min(1.1, 1.1)         = 1.1   unclipped (inside the range)
        mean over its 3 tokens: 2.8 / 3 = 14/15
    Sequence 1, A = -2, two tokens and one padding position (any values, masked out):
        ratio 0.5: min(0.5 * -2, 0.8 * -2) = min(-1.0, -1.6) = -1.6   clipped below (binds)
        ratio 1.5: min(1.5 * -2, 1.2 * -2) = min(-3.0, -2.4) = -3.0   unclipped (pessimistic bound)
        mean over its 2 tokens: -4.6 / 2 = -2.3
    J = (14/15 - 2.3) / 2 = -41/60, loss = -J = 41/60; clip fraction 2 of 5 tokens = 0.4.
    Gradient of the loss w.r.t. logp (d ratio / d logp = ratio), -(1/2)(1/|o_i|) ratio A where
    unclipped, 0 where clipped: seq 0: 0, -(1/6)(0.5) = -1/12, -(1/6)(1.1) = -0.18333..;
    seq 1: 0, -(1/4)(1.5)(-2) = +0.75; padding 0. ref = logp: KL 0 and no KL gradient."""
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 7.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.zeros(2, 3, dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, old, logp.detach(), advantages, mask, clip_eps=0.2, kl_coef=0.04)
    assert loss.item() == pytest.approx(41 / 60, abs=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(0.4)
    assert metrics["kl"].item() == 0.0
    loss.backward()
    expected = [[0.0, -1 / 12, -1.1 / 6], [0.0, 0.75, 0.0]]
    np.testing.assert_allclose(logp.grad.numpy(), expected, atol=1e-12)


# --- 3. KL: the k3 estimator ----------------------------------------------------------------------------
def test_k3_kl_equals_the_float64_formula_and_is_zero_at_the_reference():
    g = torch.Generator().manual_seed(1)
    logp, ref = (-3 * torch.rand(3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    expected = [[math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(row, ref_row)]
                for row, ref_row in zip(logp.tolist(), ref.tolist())]
    np.testing.assert_allclose(k3_kl(logp, ref).numpy(), expected, rtol=1e-12)
    assert (k3_kl(logp, ref) > 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))


def test_loss_equals_a_float64_loop_over_sequences_and_tokens():
    """The paper's 1/G sum_i 1/|o_i| sum_t [min(...) - beta KL], written as plain loops."""
    g = torch.Generator().manual_seed(2)
    N, T, eps, beta = 4, 6, 0.2, 0.1
    logp, old, ref = (-2 * torch.rand(N, T, generator=g, dtype=torch.float64) for _ in range(3))
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = [6, 3, 1, 4]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    total, kl_total = 0.0, 0.0
    for i in range(N):
        terms, kls = [], []
        for t in range(lengths[i]):
            rho, a = math.exp(logp[i, t] - old[i, t]), advantages[i].item()
            kl = math.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]).item() - 1
            terms.append(min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) - beta * kl)
            kls.append(kl)
        total += sum(terms) / len(terms)
        kl_total += sum(kls) / len(kls)
    loss, metrics = grpo_loss(logp, old, ref, advantages, mask, eps, beta)
    assert loss.item() == pytest.approx(-total / N, rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(kl_total / N, rel=1e-12)


# --- 4. sampling a group as training rows ---------------------------------------------------------------
def partial_reward(prediction, example):
    return partial(prediction, example["answer"])


def test_collate_masks_everything_but_the_completions():
    rows = [{"ids": [1, 2, 3, 4, 5], "prompt": 3, "advantage": 0.5, "old": [-0.1, -0.2], "ref": [-0.3, -0.4]},
            {"ids": [1, 2, 6], "prompt": 2, "advantage": -0.5, "old": [-0.5], "ref": [-0.6]}]
    t = collate(rows, torch.device("cpu"))
    assert t["x"].tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert t["y"].tolist() == [[-100, -100, 4, 5], [-100, 6, -100, -100]]
    assert torch.equal(t["old_logp"], torch.tensor([[0, 0, -0.1, -0.2], [0, -0.5, 0, 0]]))  # float32
    assert torch.equal(t["ref_logp"], torch.tensor([[0, 0, -0.3, -0.4], [0, -0.6, 0, 0]]))
    assert t["advantages"].tolist() == [0.5, -0.5]
    assert collate([{**r, "old": None} for r in rows], torch.device("cpu"))["old_logp"] is None


def test_sample_groups_builds_rows_from_the_template_and_scores_the_text(env):
    model, tokenizer = load_for_inference(env["full"])
    examples = tasks.load_tasks(env["chat"], "train")[:3]
    G, max_new = 4, 10
    seeds = list(range(100, 100 + 3 * G))
    rows, rewards, texts = sample_groups(model, tokenizer, examples, G, max_new, 1.0, seeds, partial_reward)
    assert rewards.shape == (3, G) and len(rows) == len(texts) == 3 * G
    stops = set(chat.stop_token_ids(tokenizer))
    ended = 0
    for i, (row, text) in enumerate(zip(rows, texts)):
        example = examples[i // G]
        prompt = chat.render(tokenizer, example["messages"][:-1], add_generation_prompt=True)
        assert row["ids"][:row["prompt"]] == prompt
        completion = row["ids"][row["prompt"]:]
        assert not stops & set(completion[:-1])  # nothing after a stop token
        if completion[-1] in stops:  # it stopped: the stop token trains (the model must learn to stop)
            ended += 1
            assert text == tokenizer.decode(completion[:-1])
        else:  # cut at max_new_tokens: no stop token to train on
            assert len(completion) == max_new and text == tokenizer.decode(completion)
        assert rewards.flatten()[i].item() == partial(text, example["answer"])
    assert ended > 0  # the fine-tuned model does stop
    again = sample_groups(model, tokenizer, examples, G, max_new, 1.0, seeds, partial_reward)
    assert again[0] == rows  # seeded
    assert sample_groups(model, tokenizer, examples, G, max_new, 1.0, [s + 1 for s in seeds],
                         partial_reward)[0] != rows


def test_sample_groups_samples_from_the_adapted_model(env):
    """Generation's packed decoder reads base weights: sampling must fold the adapter in. Samples
    from a LoRA model equal those of the same model merged by hand, and differ from the base's."""
    model, tokenizer = load_for_inference(env["full"])
    examples = tasks.load_tasks(env["chat"], "train")[:2]
    seeds = list(range(8))
    base_rows = sample_groups(model, tokenizer, examples, 4, 10, 1.0, seeds, partial_reward)[0]
    torch.manual_seed(0)
    lora.add_lora(model, rank=4, alpha=16.0)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B["default"].weight.normal_(0, 0.5)
    adapted = sample_groups(model, tokenizer, examples, 4, 10, 1.0, seeds, partial_reward)[0]
    assert not any(m.merged for m in lora.lora_layers(model).values())  # unmerged after
    lora.strip_lora(model)  # merged for good: plain nn.Linear layers
    assert sample_groups(model, tokenizer, examples, 4, 10, 1.0, seeds, partial_reward)[0] == adapted
    assert adapted != base_rows


# --- 5. runs -------------------------------------------------------------------------------------
FAST = ["dtype=float32", "threads=1", "batch_size=2", "group_size=4", "max_new_tokens=10", "eval_interval=0",
        "eval_batches=1", "log_interval=1", "warmup_steps=2", "val_every=6", "reward=partial"]
DIAGNOSTICS = ("reward", "reward_std", "completion_length", "kl", "clip_fraction")


def grpo_configs(env, out, *pairs: str):
    return align.align_configs(str(env["full"]), str(env["chat"]), str(out), "grpo", [*FAST, *pairs])


def run_grpo(env, out, *pairs: str, resume: bool = False) -> dict:
    return train_loop.train(GRPOTrainer(*grpo_configs(env, out, *pairs), resume=resume, quiet=True))


def train_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rows
            if r.get("train_loss") is not None]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_lora_and_full_runs_log_diagnostics_and_start_at_the_reference(tmp_path, env, lora_rank):
    before = digests(env["full"])
    run = tmp_path / "run"
    summary = run_grpo(env, run, "max_steps=4", f"lora_rank={lora_rank}")
    assert summary["step"] == 4 and 0.0 <= summary["val_loss"] <= 1.0
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(all(k in r and math.isfinite(r[k]) for k in DIAGNOSTICS) for r in rows)
    assert rows[0]["kl"] == 0.0  # step 1: the policy is the reference (adapter B = 0, or the copy)
    assert rows[-1]["kl"] > 0.0  # and then it moves away
    lines = (run / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "val_loss" in line]
    assert evals[-1]["val_loss"] == pytest.approx(1 - evals[-1]["val_reward"])
    assert digests(env["full"]) == before, "GRPO wrote into the SFT run"
    config = json.loads((run / "config.json").read_text())
    assert config["align"]["sft_run"] == str(env["full"]) and config["align"]["method"] == "grpo"
    if lora_rank:
        adapter = load_file(run / "adapter.safetensors")
        assert not (run / "model.safetensors").exists()
        assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k), "B never trained"
    else:
        sft, new = load_file(env["full"] / "model.safetensors"), load_file(run / "model.safetensors")
        assert sft.keys() == new.keys() and any(not np.array_equal(sft[k], new[k]) for k in sft)


def test_a_seeded_run_is_reproducible(tmp_path, env):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_grpo(env, tmp_path / name, "max_steps=3", "lora_rank=4", f"seed={seed}")
    a, b, c = (train_rows(tmp_path / n) for n in "abc")
    assert a == b
    assert [r["reward"] for r in a] != [r["reward"] for r in c]  # another seed samples otherwise
    wa, wb = (load_file(tmp_path / n / "adapter.safetensors") for n in "ab")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_groups_are_sampled_from_the_current_weights_and_any_callable_rewards(tmp_path, env):
    """After optimizer steps (fused AdamW writes in place), a rollout equals one from a fresh copy of
    the weights: generation's cached packed copy must not be stale. A Python callable is the reward."""
    calls = []

    def reward(prediction, example):  # favours short answers
        calls.append(prediction)
        return 1.0 / (1 + len(prediction))

    cfg, ac = grpo_configs(env, tmp_path / "run", "max_steps=4", "lr=1e-2")
    trainer = GRPOTrainer(cfg, ac, quiet=True, reward=reward)
    for _ in range(3):
        trainer.train_step()
        trainer.step += 1
    assert len(calls) == 3 * 2 * 4  # steps x prompts x G
    assert trainer.step_metrics["reward"] == pytest.approx(np.mean([1 / (1 + len(p)) for p in calls[-8:]]))
    examples, seeds = trainer.data.draw(7, 0)
    fresh = copy.deepcopy(trainer.model)
    rows = sample_groups(trainer.model, trainer.tokenizer, examples, 4, 10, 1.0, seeds, reward)[0]
    assert rows == sample_groups(fresh, trainer.tokenizer, examples, 4, 10, 1.0, seeds, reward)[0]


KILLED = """import sys
from minillm import align, train_loop
from minillm.torch.grpo_train import GRPOTrainer
sft, data, out, *pairs = sys.argv[1:]
train_loop.train(GRPOTrainer(*align.align_configs(sft, data, out, "grpo", pairs), quiet=True))
"""


def test_exact_resume_after_sigkill_full_and_lora(tmp_path, env):
    """N steps straight == k steps, SIGKILL, resume, N - k steps: same metrics rows (losses, rewards,
    KL ...), bitwise same weights. Full: dropout on (the RNG must resume) and grpo_iterations 2 with
    a checkpoint every 5 steps, so the kill lands in the middle of a round (the sampled batch must
    be in the resume point); LoRA: one step per batch."""
    steps, weights = 16, {"full": "model.safetensors", "lora": "adapter.safetensors"}
    pairs = {"full": ["model.dropout=0.1", "grpo_iterations=2", "lora_rank=0"], "lora": ["lora_rank=4"]}
    pairs = {m: [*p, f"max_steps={steps}", "checkpoint_interval=5"] for m, p in pairs.items()}
    procs = {m: subprocess.Popen([sys.executable, "-c", KILLED, str(env["full"]), str(env["chat"]),
                                  str(tmp_path / m / "killed"), *FAST, *pairs[m]],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for m in weights}
    states = {m: tmp_path / m / "killed" / "trainer_state.json" for m in weights}
    kill_at_first_checkpoint(procs, states)  # each killed as soon as its first resume point exists
    for m, state in states.items():
        saved = json.loads(state.read_text())
        assert 0 < saved["step"] < steps, f"{m}: the kill should land mid-run (checkpoint at {saved['step']})"
    full = json.loads(states["full"].read_text())
    assert full["step"] % 2 == 1, f"the full run's kill should land mid-round (step {full['step']})"
    assert full["loader"]["batches"], "a mid-round state holds its batch"
    for m, file in weights.items():
        run_grpo(env, tmp_path / m / "straight", *pairs[m])
        run_grpo(env, tmp_path / m / "killed", *pairs[m], resume=True)
        a, b = train_rows(tmp_path / m / "straight"), train_rows(tmp_path / m / "killed")
        assert [r["step"] for r in a] == list(range(1, steps + 1)), m
        assert a == b, f"{m}: metrics differ"
        wa, wb = (load_file(tmp_path / m / name / file) for name in ("straight", "killed"))
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa), m
