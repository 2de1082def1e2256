"""Using a fine-tuned run: load_for_inference against torch/lora unmerged and peft, `--adapter`,
`minillm merge` against the float64 merge formula, task answers against a naive greedy decoder,
`eval --tasks --json`. The runs are tests/torch/conftest.py's `env`."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.cli import main as cli
from minillm.data import tasks
from minillm.torch import lora
from minillm.torch.evaluate import answer_tasks
from minillm.torch.model import load_model
from minillm.torch.sft import load_for_inference
from tests.torch.conftest import NAMES, PLACES, THINGS, chat_turns, hand_render, one_line_error


# --- 4. using a LoRA run --------------------------------------------------------------------------
def test_load_for_inference_equals_the_base_with_the_adapter_unmerged(env):
    model, tokenizer = load_for_inference(env["lora"])
    reference, _ = load_model(env["base"])
    base_only = copy.deepcopy(reference)
    lora.load_adapter(reference, env["lora"])  # unmerged LoRALinear layers
    assert lora.lora_layers(reference) and not any(m.merged for m in lora.lora_layers(reference).values())
    assert not lora.lora_layers(model), "the inference model should hold plain nn.Linear layers"
    x = torch.tensor([tokenizer.encode("Where does Bob see the moon? By the gate.")])
    with torch.no_grad():
        got, want, base = model(x), reference(x), base_only(x)
    assert (want - base).abs().max() > 1e-3, "the adapter should change the logits"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _sample(capsys, *args: str) -> str:
    assert cli(["sample", "--prompt", "Anne sees", "--temperature", "0", "--max-new-tokens", "40",
                *args]) == 0
    return capsys.readouterr().out


def test_adapter_flag_equals_the_lora_run_and_refuses_a_lora_run(env, capsys):
    base, run = str(env["base"]), str(env["lora"])
    via_run = _sample(capsys, "--run", run)
    assert via_run == _sample(capsys, "--run", base, "--adapter", run) and via_run.startswith("Anne sees")
    assert via_run != _sample(capsys, "--run", base), "the adapter should change the sample"
    one_line_error(capsys, ["sample", "--run", run, "--adapter", run], "is a LoRA run")


def test_lora_run_also_saves_the_adapter_for_peft(env):
    """The run's peft/ directory loads in peft on the transformers export of the base: same logits."""
    peft = pytest.importorskip("peft")
    from minillm.interop.hf import to_transformers

    base, _ = load_model(env["base"])
    hf = peft.PeftModel.from_pretrained(to_transformers(base), str(env["lora"] / "peft")).eval()
    ours, _ = load_for_inference(env["lora"])
    tokens = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=0)


def test_merge_writes_the_merged_weights_of_the_float64_formula(env, tmp_path, capsys):
    """model.safetensors of `minillm merge` is W + (alpha / r) B A computed here in float64 from
    the adapter files; the merged run samples like the LoRA run. Refusals are one-line errors."""
    out = tmp_path / "merged"
    assert cli(["merge", "--run", str(env["lora"]), "--out", str(out)]) == 0
    capsys.readouterr()
    base, merged = load_file(env["base"] / "model.safetensors"), load_file(out / "model.safetensors")
    adapter = load_file(env["lora"] / "adapter.safetensors")
    config = json.loads((env["lora"] / "adapter.json").read_text())
    scale = config["alpha"] / config["rank"]
    assert merged.keys() == base.keys()
    adapted = 0
    for name, w in base.items():
        a = adapter.get(name.replace(".weight", ".lora_A.weight"))
        expected = w.astype(np.float64)
        if a is not None:
            b = adapter[name.replace(".weight", ".lora_B.weight")].astype(np.float64)
            expected, adapted = expected + scale * (b @ a.astype(np.float64)), adapted + 1
        np.testing.assert_allclose(merged[name], expected, atol=1e-6, rtol=0, err_msg=name)
    assert adapted == len(adapter) // 2 > 0
    assert _sample(capsys, "--run", str(out)) == _sample(capsys, "--run", str(env["lora"]))
    one_line_error(capsys, ["merge", "--run", str(env["lora"]), "--out", str(out)], "already exists")
    not_lora = ["merge", "--run", str(env["base"]), "--out", str(tmp_path / "x")]
    one_line_error(capsys, not_lora, "not a LoRA run")


# --- 5. task answers and eval --json --------------------------------------------------------------
def _naive_answers(model, tokenizer, examples: list[dict], train: list[dict], shots: int) -> list[str]:
    """Greedy answers the slow way, in float64: the prompt rendered by hand, a full forward for
    every token, argmax over the tokenizer's ids, stop at eos or any other template token (a new
    turn) or after 64 tokens; no KV cache, no batching. Every argmax must be clear (a near tie
    could flip under the fast decoder's float32 rounding)."""
    model, answers = copy.deepcopy(model).double(), []
    stops = {tokenizer.special_id(n) for n in ("eos", "bos", "system", "user", "assistant")}
    for e in examples:
        messages = tasks.few_shot_messages(train, e, shots) if shots else e["messages"][:-1]
        ids, out = hand_render(tokenizer, messages, generation_prompt=True)[0], []
        with torch.no_grad():
            while len(out) < 64:
                logits = model(torch.tensor([ids + out]))[0, -1, :tokenizer.vocab_size]  # (V,)
                top = logits.topk(2).values
                assert top[0] - top[1] > 1e-4, "a near tie: the test needs a model with clear argmaxes"
                if int(logits.argmax()) in stops:
                    break
                out.append(int(logits.argmax()))
        answers.append(tokenizer.decode(out))
    return answers


@pytest.fixture(scope="module")
def task_env(env) -> dict:
    """A task directory for the full fine-tune (its greedy answers are short and end with eos):
    train.jsonl, and test.jsonl whose answers are rigged from the naive decoder's zero-shot
    answers (even examples right, odd ones wrong); the naive answers with 0 and 2 shots."""
    def task(question: str, answer: str, kind: str) -> dict:
        return {"messages": chat_turns(question, answer), "kind": kind}

    train = [task(f"Where does {a} see the {b}?", "By the gate.", "where") for a in NAMES for b in THINGS]
    train += [task(f"Who sees the {b}?", a, "who") for a in NAMES for b in THINGS]
    test = [task(f"Where does {a} see the {c}?", "?", "where") for a in NAMES for c in PLACES[:2]]
    test += [task(f"Who sees the {c}?", "?", "who") for c in PLACES]
    model, tokenizer = load_model(env["full"])
    naive = {0: _naive_answers(model, tokenizer, test, train, 0)}
    for i, e in enumerate(test):
        e["messages"][-1]["content"] = e["answer"] = naive[0][i] + ("" if i % 2 == 0 else " no")
    naive[2] = _naive_answers(model, tokenizer, test, train, 2)  # the shots depend on the whole example
    tasks.write_jsonl(train, env["root"] / "tasks" / "train.jsonl")
    tasks.write_jsonl(test, env["root"] / "tasks" / "test.jsonl")
    return dict(run=env["full"], dir=env["root"] / "tasks", naive=naive, test=test)


@pytest.mark.parametrize("shots", [0, 2])
def test_answer_tasks_equals_naive_greedy_decoding(task_env, shots):
    model, tokenizer = load_model(task_env["run"])
    test, train = tasks.load_tasks(task_env["dir"], "test"), tasks.load_tasks(task_env["dir"], "train")
    want = task_env["naive"][shots]
    assert answer_tasks(model, tokenizer, test, train, shots, batch_size=3) == want  # mixed lengths
    assert len(set(want)) > 1, "a decoder that answers everything alike proves little"
    assert all(0 < len(a) < 40 for a in want), "answers should end with eos, well before 64 tokens"


def _eval_json(capsys, *args: str) -> dict:
    assert cli(["eval", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one JSON object, one line
    return json.loads(out)


def test_eval_tasks_json_reports_exact_match(task_env, capsys):
    run, directory = str(task_env["run"]), str(task_env["dir"])
    test, naive = task_env["test"], task_env["naive"]
    result = _eval_json(capsys, "--run", run, "--tasks", directory)
    right, n = (len(test) + 1) // 2, len(test)  # rigged: even examples right
    assert (result["correct"], result["total"], result["exact_match"]) == (right, n, right / n)
    assert result == {**tasks.score(naive[0], test), "split": "test"}
    limited = _eval_json(capsys, "--run", run, "--tasks", directory, "--limit", "4")
    assert (limited["correct"], limited["total"]) == (2, 4)
    few_shot = _eval_json(capsys, "--run", run, "--tasks", directory, "--few-shot", "2")
    assert few_shot == {**tasks.score(naive[2], test), "split": "test"}


def test_eval_tasks_answer_length_is_bounded_by_the_context(task_env, capsys):
    run, directory = str(task_env["run"]), str(task_env["dir"])
    for bad in ("0", "256"):  # the context is 256 tokens: an answer needs 1 .. 255
        one_line_error(capsys, ["eval", "--run", run, "--tasks", directory, "--max-new-tokens", bad],
                       f"--max-new-tokens {bad}: must be between 1 and 255")
    short = _eval_json(capsys, "--run", run, "--tasks", directory, "--max-new-tokens", "200")
    assert short == _eval_json(capsys, "--run", run, "--tasks", directory)  # the answers are short


def test_eval_adapter_flag_equals_the_lora_run(env, task_env, capsys):
    base, run, directory = str(env["base"]), str(env["lora"]), str(task_env["dir"])
    via_run = _eval_json(capsys, "--run", run, "--tasks", directory)
    assert via_run == _eval_json(capsys, "--run", base, "--adapter", run, "--tasks", directory)
    assert via_run["total"] == len(task_env["test"])
    one_line_error(capsys, ["eval", "--run", run, "--adapter", run, "--tasks", directory], "is a LoRA run")


def test_eval_data_json_equals_the_text_report(env, capsys):
    args = ["eval", "--run", str(env["base"]), "--data", str(env["data"]), "--block-size", "32"]
    result = _eval_json(capsys, *args[1:])
    assert cli(args) == 0
    text = capsys.readouterr().out
    found = re.search(r"loss ([\d.]+) nats/token \| perplexity ([\d.]+) \| ([\d.]+) bits", text).groups()
    assert f"{result['tokens']:,} tokens, block 32" in text
    assert (round(result["loss"], 4), round(result["perplexity"], 3), round(result["bits_per_token"], 4)) \
        == tuple(map(float, found))
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-12)


