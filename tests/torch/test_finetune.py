"""Fine-tuning runs (minillm.finetune, torch/sft.py, `minillm finetune`): exact resume after SIGKILL,
what a run holds, the trained positions against a float64 loss by hand, bad input as one-line
errors. The base run and its fine-tunes are tests/torch/conftest.py's `env`; using the result is
test_finetune_use.py; LoRA, the template and the task sets are tested in their own files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.cli import main as cli
from minillm.torch.model import load_model
from tests.conftest import kill_at_first_checkpoint, train_losses
from tests.torch.conftest import EXAMPLES, chat_turns, digests, finetune_args, hand_render, one_line_error


# --- 1. exact resume after SIGKILL ----------------------------------------------------------------
def test_exact_resume_after_sigkill_full_and_lora(tmp_path, env):
    """N steps straight == k steps, SIGKILL, --resume, N - k steps: same losses, bitwise same
    model.safetensors / adapter.safetensors. Dropout is on (model or adapter): the RNG state must
    resume too. The killed runs start together (start-up dominates); the rest runs in-process."""
    steps, weights = 60, {"full": "model.safetensors", "lora": "adapter.safetensors"}
    dropout = {"full": "model.dropout=0.1", "lora": "lora_dropout=0.1"}
    args = {(m, name): finetune_args(env["base"], env["chat"], tmp_path / m / name, m, f"max_steps={steps}",
                                      "checkpoint_interval=4", dropout[m])
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
        assert sorted(a) == sorted(b) == list(range(1, steps + 1)), m
        assert all(a[s] == b[s] for s in a), f"{m}: loss sequences differ"
        wa, wb = (load_file(tmp_path / m / name / file) for name in ("straight", "killed"))
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa), m


# --- 2. what a run directory holds ----------------------------------------------------------------
def test_lora_run_holds_the_adapter_alone_and_names_its_base(env):
    run = env["lora"]
    assert digests(env["base"]) == env["basedigests"], "fine-tuning wrote into the base run"
    assert not (run / "model.safetensors").exists() and not (run / "best" / "model.safetensors").exists()
    adapter = load_file(run / "adapter.safetensors")
    names = re.compile(r"blocks\.\d\.(attn|mlp)\.\w+\.lora_[AB]\.weight")
    assert adapter and all(names.fullmatch(k) for k in adapter)
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k), "B never trained"
    state = load_file(run / "trainer_state.safetensors")
    assert {k.split(".")[0] for k in state} == {"model", "adam", "rng"}
    weights = {k for k in state if not k.startswith("rng.")}
    assert all(".lora_A." in k or ".lora_B." in k for k in weights), sorted(weights)[:5]
    # the resume point names the adapter's parameters as the module does (adapter "default")
    assert {k.removeprefix("model.").replace(".default.", ".") for k in weights if k.startswith("model.")} \
        == set(adapter)
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["base_run"] == str(env["base"]) and config["finetune"]["method"] == "lora"
    assert (run / "tokenizer.json").read_text() == (env["base"] / "tokenizer.json").read_text()


def test_full_run_writes_new_weights_and_names_its_base(env):
    base, full = load_file(env["base"] / "model.safetensors"), load_file(env["full"] / "model.safetensors")
    assert base.keys() == full.keys()
    assert all(not np.array_equal(base[k], full[k]) for k in base), "every weight trains in full fine-tuning"
    config = json.loads((env["full"] / "config.json").read_text())
    assert config["finetune"]["base_run"] == str(env["base"]) and config["finetune"]["method"] == "full"
    assert config["model"] == json.loads((env["base"] / "config.json").read_text())["model"]


# --- 3. labels: the trainer's loss against a float64 loss over the answers, by hand --------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_step0_loss_is_cross_entropy_over_the_answers_only(tmp_path, env, method):
    """One batch holding every training example once: the logged step-1 loss (before any update)
    is the base model's mean float64 cross-entropy over the trained targets."""
    train = EXAMPLES[:-1]  # val_every = len(EXAMPLES): the last example is held out
    assert cli(finetune_args(env["base"], env["chat"], tmp_path / "run", method, "max_steps=1",
                              f"batch_size={len(train)}")) == 0
    model, tokenizer = load_model(env["base"])
    nll = []
    with torch.no_grad():
        for record in train:
            ids, trained = hand_render(tokenizer, record.get("messages") or chat_turns(record["prompt"],
                                                                                   record["completion"]))
            logp = torch.log_softmax(model.double()(torch.tensor([ids[:-1]]))[0], dim=-1)  # (T, V) float64
            nll += [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if trained[t + 1]]
    assert len(nll) > len(train)  # answers and their eos tokens
    assert train_losses(tmp_path / "run")[1] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


# --- 6. bad input: one line, exit code 2, nothing left behind ----------------------------------------


@pytest.mark.parametrize("case", ["not JSON", "unknown role", "unknown key", "lora_rank 0", "no base run"])
def test_bad_input_is_aone_line_error_and_leaves_no_run(tmp_path, env, capsys, case):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(EXAMPLES[0]), json.dumps(EXAMPLES[1]), "{not json"] if case == "not JSON" else \
        [json.dumps({"messages": [{"role": "robot", "content": "x"}]})]
    bad.write_text("\n".join(lines) + "\n")
    base, data, pairs, needles = {
        "not JSON": (env["base"], bad, [], [f"{bad}:3:", "not JSON"]),
        "unknown role": (env["base"], bad, [], [f"{bad}:1:", "'robot'"]),
        "unknown key": (env["base"], env["chat"], ["no_such_key=1"], ["no_such_key"]),
        "lora_rank 0": (env["base"], env["chat"], ["lora_rank=0"], ["lora_rank"]),
        "no base run": (tmp_path / "nowhere", env["chat"], [], [str(tmp_path / "nowhere")]),
    }[case]
    one_line_error(capsys, finetune_args(base, data, tmp_path / "out", "lora", *pairs), *needles)
    assert not (tmp_path / "out").exists()


def test_an_unknown_method_is_refused_by_the_parser(tmp_path, env, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: usage line + error line
        cli(finetune_args(env["base"], env["chat"], tmp_path / "out", "bogus"))
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("change", [("lora", "lora_rank=4"), ("full",), ("lora", "lora_targets=q,v")])
def test_resume_with_other_settings_is_refused_and_the_run_is_intact(tmp_path, env, capsys, change):
    run = tmp_path / "run"
    shutil.copytree(env["lora"], run)
    before = digests(run)
    method, *pairs = change
    args = finetune_args(env["base"], env["chat"], run, method, "max_steps=15", "lr=1e-2", "min_lr=1e-3",
                          *pairs)
    one_line_error(capsys, args + ["--resume"], "was fine-tuned with other settings")
    assert digests(run) == before


# --- 7. help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,options", [
    ("finetune", ["--run", "--data", "--method", "--out", "--set", "--resume", "lora_rank", "full", "lora"]),
    ("eval", ["--run", "--data", "--tasks", "--few-shot", "--limit", "--json", "--adapter"]),
])
def test_help_mentions_the_key_options(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        cli([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(o in text for o in options), [o for o in options if o not in text]
