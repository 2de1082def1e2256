"""Fine-tuning end to end (minillm.finetune, torch/sft.py, `minillm finetune`, `eval --tasks`,
`--adapter`): exact resume after SIGKILL, what a run holds, the trained positions against a float64
loss by hand, a LoRA run against torch/lora unmerged, task answers against a naive greedy decoder,
bad input as one-line errors. One tiny char-level base run per module (max_seq_len 256) and a small
chat JSONL keep it fast; LoRA, the template and the task sets are tested in their own files."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
from tests.conftest import prepare_char_data, train_losses

NAMES, THINGS, PLACES = ("Anne", "Bob", "Cleo"), ("sea", "hill", "moon"), ("gate", "tower", "river", "bridge")


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# 24 examples: 21 prompt/completion pairs, 3 multi-turn conversations with a system turn
EXAMPLES = ([{"prompt": f"Where does {a} see the {b}?", "completion": f"By the {PLACES[(i + j) % 4]}."}
             for i, a in enumerate(NAMES) for j, b in enumerate(THINGS)]
            + [{"prompt": f"What does {a} see by the {c}?", "completion": f"The {THINGS[(i + j) % 3]}."}
               for i, a in enumerate(NAMES) for j, c in enumerate(PLACES)]
            + [{"messages": [{"role": "system", "content": "Answer briefly."},
                             *_chat(f"Who sees the {b}?", a), *_chat("Where?", f"By the {c}.")]}
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


def _finetune_args(base: Path, data: Path, out: Path, method: str, *pairs: str) -> list[str]:
    sets = [arg for pair in (*FAST, *pairs) for arg in ("--set", pair)]
    return ["finetune", "--run", str(base), "--data", str(data), "--method", method, "--out", str(out),
            "--quiet", *sets]


def _digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _keep_thread_count():
    """The runs here set torch's thread count (threads=1) in this process: put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
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
    before = _digests(root / "base")
    for method, steps in (("lora", 15), ("full", 60)):  # full: long enough to answer briefly, then eos
        assert cli(_finetune_args(root / "base", chat, root / method, method, f"max_steps={steps}",
                                  "lr=1e-2", "min_lr=1e-3")) == 0
    return dict(root=root, data=data, base=root / "base", chat=chat, lora=root / "lora", full=root / "full",
                base_digests=before)


# --- 1. exact resume after SIGKILL ----------------------------------------------------------------
def test_exact_resume_after_sigkill_full_and_lora(tmp_path, env):
    """N steps straight == k steps, SIGKILL, --resume, N - k steps: same losses, bitwise same
    model.safetensors / adapter.safetensors. Dropout is on (model or adapter): the RNG state must
    resume too. The killed runs start together (start-up dominates); the rest runs in-process."""
    steps, weights = 60, {"full": "model.safetensors", "lora": "adapter.safetensors"}
    dropout = {"full": "model.dropout=0.1", "lora": "lora_dropout=0.1"}
    args = {(m, name): _finetune_args(env["base"], env["chat"], tmp_path / m / name, m, f"max_steps={steps}",
                                      "checkpoint_interval=4", dropout[m])
            for m in weights for name in ("straight", "killed")}
    procs = {m: subprocess.Popen([sys.executable, "-m", "minillm.cli", *args[m, "killed"]],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for m in weights}
    states = {m: tmp_path / m / "killed" / "trainer_state.json" for m in weights}
    try:  # watch both: each is killed as soon as its first resume point exists
        running, deadline = dict(procs), time.time() + 120
        while running and time.time() < deadline:
            for m, proc in list(running.items()):
                if states[m].exists() or proc.poll() is not None:
                    proc.kill()  # the kill under test
                    del running[m]
            time.sleep(0.002)
    finally:  # no training process left behind if the wait fails
        for proc in procs.values():
            proc.kill()
            proc.wait()
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
    assert _digests(env["base"]) == env["base_digests"], "fine-tuning wrote into the base run"
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
def _hand_render(tokenizer, messages: list[dict], generation_prompt: bool = False):
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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_step0_loss_is_cross_entropy_over_the_answers_only(tmp_path, env, method):
    """One batch holding every training example once: the logged step-1 loss (before any update)
    is the base model's mean float64 cross-entropy over the trained targets."""
    train = EXAMPLES[:-1]  # val_every = len(EXAMPLES): the last example is held out
    assert cli(_finetune_args(env["base"], env["chat"], tmp_path / "run", method, "max_steps=1",
                              f"batch_size={len(train)}")) == 0
    model, tokenizer = load_model(env["base"])
    nll = []
    with torch.no_grad():
        for record in train:
            ids, trained = _hand_render(tokenizer, record.get("messages") or _chat(record["prompt"],
                                                                                   record["completion"]))
            logp = torch.log_softmax(model.double()(torch.tensor([ids[:-1]]))[0], dim=-1)  # (T, V) float64
            nll += [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if trained[t + 1]]
    assert len(nll) > len(train)  # answers and their eos tokens
    assert train_losses(tmp_path / "run")[1] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


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
    _one_line_error(capsys, ["sample", "--run", run, "--adapter", run], "is a LoRA run")


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
        ids, out = _hand_render(tokenizer, messages, generation_prompt=True)[0], []
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
        return {"messages": _chat(question, answer), "kind": kind}

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


def test_eval_adapter_flag_equals_the_lora_run(env, task_env, capsys):
    base, run, directory = str(env["base"]), str(env["lora"]), str(task_env["dir"])
    via_run = _eval_json(capsys, "--run", run, "--tasks", directory)
    assert via_run == _eval_json(capsys, "--run", base, "--adapter", run, "--tasks", directory)
    assert via_run["total"] == len(task_env["test"])
    _one_line_error(capsys, ["eval", "--run", run, "--adapter", run, "--tasks", directory], "is a LoRA run")


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


# --- 6. bad input: one line, exit code 2, nothing left behind ----------------------------------------
def _one_line_error(capsys, args: list[str], *needles: str) -> None:
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minillm {args[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(n in err for n in needles), err


@pytest.mark.parametrize("case", ["not JSON", "unknown role", "unknown key", "lora_rank 0", "no base run"])
def test_bad_input_is_a_one_line_error_and_leaves_no_run(tmp_path, env, capsys, case):
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
    _one_line_error(capsys, _finetune_args(base, data, tmp_path / "out", "lora", *pairs), *needles)
    assert not (tmp_path / "out").exists()


def test_an_unknown_method_is_refused_by_the_parser(tmp_path, env, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: usage line + error line
        cli(_finetune_args(env["base"], env["chat"], tmp_path / "out", "bogus"))
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("change", [("lora", "lora_rank=4"), ("full",), ("lora", "lora_targets=q,v")])
def test_resume_with_other_settings_is_refused_and_the_run_is_intact(tmp_path, env, capsys, change):
    run = tmp_path / "run"
    shutil.copytree(env["lora"], run)
    before = _digests(run)
    method, *pairs = change
    args = _finetune_args(env["base"], env["chat"], run, method, "max_steps=15", "lr=1e-2", "min_lr=1e-3",
                          *pairs)
    _one_line_error(capsys, args + ["--resume"], "was fine-tuned with other settings")
    assert _digests(run) == before


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
