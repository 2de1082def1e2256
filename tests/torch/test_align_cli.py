"""`minillm align` (DPO / IPO) and `minillm prefs` end to end on the tiny runs of conftest's `env`:
what a run logs and holds, exact resume after SIGKILL, using the result, bad input as one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.cli import main as cli
from minillm.data.prefs import read_pairs
from minillm.data.tasks import exact_match, load_tasks
from minillm.torch.sft import load_for_inference
from tests.conftest import kill_at_first_checkpoint, train_losses
from tests.torch.conftest import EXAMPLES, FAST, digests, one_line_error

DIAGNOSTICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
               "logps/rejected", "kl")


def prompt_of(e: dict) -> dict:
    return {"prompt": e["prompt"]} if "prompt" in e else {"messages": e["messages"][:-1]}


def reply_of(e: dict) -> str:
    return e["completion"] if "prompt" in e else e["messages"][-1]["content"]


@pytest.fixture(scope="module")
def prefs_file(env):
    """One pair per chat example: chosen = its reply, rejected = the next example's reply."""
    path = env["root"] / "prefs.jsonl"
    lines = [{**prompt_of(e), "chosen": reply_of(e), "rejected": reply_of(EXAMPLES[(i + 1) % len(EXAMPLES)])}
             for i, e in enumerate(EXAMPLES)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def align_args(sft, data, out, method: str = "dpo", *pairs: str) -> list[str]:
    sets = [arg for pair in (*FAST, *pairs) for arg in ("--set", pair)]
    return ["align", "--run", str(sft), "--method", method, "--data", str(data), "--out", str(out), "--quiet",
            *sets]


@pytest.fixture(scope="module")
def runs(env, prefs_file, tmp_path_factory):
    """DPO with full weights and with a LoRA adapter, from the full SFT run: 12 steps, each on all
    23 training pairs (the 24th is held out), so the loss must fall step after step."""
    root = tmp_path_factory.mktemp("align")
    before = digests(env["full"])
    for name, pairs in (("full", ("lr=5e-4",)), ("lora", ("lora_rank=4", "lr=1e-2"))):
        assert cli(align_args(env["full"], prefs_file, root / name, "dpo", "max_steps=12",
                              f"batch_size={len(EXAMPLES) - 1}", *pairs)) == 0
    assert digests(env["full"]) == before, "alignment wrote into the SFT run"
    return dict(full=root / "full", lora=root / "lora")


# --- 1. what a run logs and holds ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "lora"])
def test_step1_is_ln2_and_the_diagnostics_are_logged_and_move(runs, name):
    rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("train_loss") is not None]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(k in r for r in train for k in DIAGNOSTICS)
    # before the first update the policy is the reference: loss ln 2, rewards and KL exactly zero
    assert train[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["rewards/margins"] == 0 and train[0]["kl"] == 0
    assert train[-1]["train_loss"] < math.log(2) - 0.05 and train[-1]["rewards/margins"] > 0
    assert train[-1]["rewards/chosen"] > train[-1]["rewards/rejected"] and train[-1]["rewards/accuracy"] > 0.5
    assert train[-1]["kl"] != 0
    val = [r for r in rows if r.get("val_loss") is not None]
    assert val and all("val_rewards/accuracy" in r and "val_kl" in r for r in val)


def test_run_directories_hold_what_inference_needs(runs, env):
    full, lora = runs["full"], runs["lora"]
    config = json.loads((lora / "config.json").read_text())
    assert config["align"]["sft_run"] == str(env["full"]) and config["align"]["lora_rank"] == 4
    assert "finetune" not in config  # not taken for a LoRA fine-tune of some base
    assert (full / "model.safetensors").is_file() and not (lora / "model.safetensors").exists()
    adapter = load_file(lora / "adapter.safetensors")
    assert adapter and any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)
    sft, aligned = load_file(env["full"] / "model.safetensors"), load_file(full / "model.safetensors")
    assert sft.keys() == aligned.keys() and any(not np.array_equal(sft[k], aligned[k]) for k in sft)


@pytest.mark.parametrize("name", ["full", "lora"])
def test_sample_and_eval_work_on_an_aligned_run(runs, tmp_path, capsys, name):
    """`minillm sample` / `eval --tasks` load the run (LoRA: the SFT weights + the adapter, merged)."""
    tasks = tmp_path / "tasks.jsonl"
    turns = [[{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["completion"]}]
             for e in EXAMPLES[:4]]
    tasks.write_text("".join(json.dumps({"messages": m}) + "\n" for m in turns))
    assert cli(["sample", "--run", str(runs[name]), "--prompt", "Anne", "--max-new-tokens", "5",
                "--seed", "1"]) == 0
    assert cli(["eval", "--run", str(runs[name]), "--tasks", str(tasks), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total"] == 4


def test_a_lora_run_loads_as_its_trained_policy(runs, env):
    """The loaded LoRA run's logits equal the SFT weights with the adapter applied unmerged."""
    from minillm.torch import lora as lora_mod

    model, _ = load_for_inference(runs["lora"])
    sft, _ = load_for_inference(env["full"])
    lora_mod.load_adapter(sft, runs["lora"])  # unmerged: the LoRALinear forward
    x = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), sft(x), rtol=1e-5, atol=1e-5)


def test_a_lora_sft_run_is_a_start_too(tmp_path, env, prefs_file):
    """From a LoRA fine-tune: its adapter is merged into the start and the reference (step 1 = ln 2),
    and the new adapter loads on top of that merge."""
    out = tmp_path / "on-lora"
    assert cli(align_args(env["lora"], prefs_file, out, "dpo", "max_steps=2", "lora_rank=4")) == 0
    assert train_losses(out)[1] == pytest.approx(math.log(2), abs=1e-6)
    model, _ = load_for_inference(out)
    sft, _ = load_for_inference(env["lora"])
    assert sorted(model.state_dict()) == sorted(sft.state_dict())  # plain layers, the adapter merged


# --- 2. exact resume after SIGKILL ----------------------------------------------------------------
def test_exact_resume_after_sigkill_full_and_lora(tmp_path, env, prefs_file):
    """N steps straight == k steps, SIGKILL, --resume, N - k steps: same losses and diagnostics,
    bitwise same weights (model.safetensors / adapter.safetensors)."""
    steps, weights = 30, {"full": "model.safetensors", "lora": "adapter.safetensors"}
    extra = {"full": ("model.dropout=0.1",), "lora": ("lora_rank=4",)}  # dropout: the RNG must resume too
    args = {(m, name): align_args(env["full"], prefs_file, tmp_path / m / name, "dpo", f"max_steps={steps}",
                                  "checkpoint_interval=3", *extra[m])
            for m in weights for name in ("straight", "killed")}
    procs = {m: subprocess.Popen([sys.executable, "-m", "minillm.cli", *args[m, "killed"]],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for m in weights}
    states = {m: tmp_path / m / "killed" / "trainer_state.json" for m in weights}
    kill_at_first_checkpoint(procs, states)  # each killed as soon as its first resume point exists
    for m, state in states.items():
        k = json.loads(state.read_text())["step"]
        assert 0 < k < steps, f"{m}: the kill should land mid-run (checkpoint at step {k})"
    for m, file in weights.items():
        assert cli(args[m, "straight"]) == 0
        assert cli(args[m, "killed"] + ["--resume"]) == 0
        a, b = train_losses(tmp_path / m / "straight"), train_losses(tmp_path / m / "killed")
        assert sorted(a) == sorted(b) == list(range(1, steps + 1)) and a == b, m
        rows = [[json.loads(line) for line in (tmp_path / m / n / "metrics.jsonl").read_text().splitlines()]
                for n in ("straight", "killed")]
        assert [{k: r.get(k) for k in DIAGNOSTICS} for r in rows[0]] \
            == [{k: r.get(k) for k in DIAGNOSTICS} for r in rows[1]], m
        wa, wb = (load_file(tmp_path / m / name / file) for name in ("straight", "killed"))
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa), m


def test_ipo_runs_and_its_step1_loss_is_the_squared_target(tmp_path, env, prefs_file):
    assert cli(align_args(env["full"], prefs_file, tmp_path / "ipo", "ipo", "max_steps=3", "beta=0.5")) == 0
    assert train_losses(tmp_path / "ipo")[1] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-6)


# --- 3. minillm prefs --------------------------------------------------------------------------------
def test_prefs_builds_on_policy_pairs_and_counts(tmp_path, env, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "train.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": e["prompt"]},
                                 {"role": "assistant", "content": e["completion"]}], "kind": "where"}) + "\n"
        for e in EXAMPLES[:8]))
    outs = [tmp_path / f"prefs{i}.jsonl" for i in range(2)]
    for out in outs:
        assert cli(["prefs", "--run", str(env["full"]), "--tasks", str(tasks), "--out", str(out),
                    "--samples", "3", "--temperature", "1.5", "--seed", "7", "--json"]) == 0
    counts = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert outs[0].read_bytes() == outs[1].read_bytes(), "the same seed gives the same pairs"
    pairs, examples = read_pairs(outs[0]), load_tasks(tasks, "train")
    assert counts[0]["prompts"] == 8 and counts[0]["pairs"] == len(pairs) == 8 - counts[0]["no_wrong"]
    by_prompt = {json.dumps(e["messages"][:-1]): e["answer"] for e in examples}
    for p in pairs:
        answer = by_prompt[json.dumps(p["messages"])]
        assert p["chosen"] == answer and not exact_match(p["rejected"], answer)


# --- 4. bad input: one line, exit code 2, nothing left behind ----------------------------------------
@pytest.mark.parametrize("case", ["bad line", "unknown key", "no SFT run", "too few pairs"])
def test_bad_input_is_a_one_line_error_and_leaves_no_run(tmp_path, env, prefs_file, capsys, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(prefs_file.read_text().splitlines()[0] + "\n" + '{"prompt": "x", "chosen": "y"}\n')
    sft, data, pairs, needles = {
        "bad line": (env["full"], bad, [], [f"{bad}:2:", "'rejected'"]),
        "unknown key": (env["full"], prefs_file, ["no_such_key=1"], ["no_such_key"]),
        "no SFT run": (tmp_path / "nowhere", prefs_file, [], [str(tmp_path / "nowhere")]),
        "too few pairs": (env["full"], prefs_file, ["val_every=100"], ["none for validation"]),
    }[case]
    one_line_error(capsys, align_args(sft, data, tmp_path / "out", "dpo", *pairs), *needles)
    assert not (tmp_path / "out").exists()


def test_an_unknown_method_is_refused_by_the_parser(tmp_path, env, prefs_file, capsys):
    with pytest.raises(SystemExit) as e:
        cli(align_args(env["full"], prefs_file, tmp_path / "out", "ppo"))
    assert e.value.code == 2 and "invalid choice: 'ppo'" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(runs, env, prefs_file, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    before = digests(run)
    args = align_args(env["full"], prefs_file, run, "dpo", "max_steps=12", "lora_rank=8", "lr=1e-2")
    one_line_error(capsys, args + ["--resume"], "was aligned with other settings")
    assert digests(run) == before


@pytest.mark.parametrize("command,options", [
    ("align", ["--run", "--method", "--data", "--out", "--set", "--resume", "dpo", "ipo", "grpo", "beta",
               "lora_rank", "label_smoothing"]),
    ("prefs", ["--run", "--tasks", "--out", "--samples", "--temperature", "--seed", "--limit"]),
])
def test_help_mentions_the_key_options(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        cli([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(o in text for o in options), [o for o in options if o not in text]
