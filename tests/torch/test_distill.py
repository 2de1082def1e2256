"""Distillation (minillm.torch.distill, `minillm distill`): the loss against a float64 formula, a
student pulled towards its teacher, the run directory's guarantees (record, resume, clear errors),
and recovery training of a pruned student that keeps its zeros."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minillm.checkpoint import load_weights, save_run
from minillm.cli import main as cli
from minillm.config import ModelConfig
from minillm.data.loader import BatchLoader
from minillm.tokenizer import load_tokenizer
from minillm.torch import prune
from minillm.torch.distill import distillation_loss
from minillm.torch.model import Transformer, model_from_params, model_params
from tests.conftest import prepare_char_data
from tests.torch.conftest import CORPUS, one_line_error

STUDENT = dict(batch_size=8, block_size=32, lr=1e-2, warmup_steps=2, eval_interval=0, eval_batches=2, seed=1,
               dtype="float32", threads=1, log_interval=1)
STUDENT_MODEL = dict(max_seq_len=64, d_model=16, n_layers=1, n_heads=2, norm="rmsnorm", positions="rope",
                     mlp="swiglu")


@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.3, 2.5), (1.0, 0.7)])
def test_loss_is_the_hinton_mix_of_ce_and_temperature_scaled_kl(alpha, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = -100  # not trained (SFT prompts, padding)
    s, t, y = student.double().numpy(), teacher.double().numpy(), targets.numpy()
    keep = y != -100
    s, t, y = s[keep], t[keep], y[keep]  # (N, V), (N, V), (N,)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    p_t = np.exp(log_softmax(t / temperature))
    kl = (p_t * (log_softmax(t / temperature) - log_softmax(s / temperature))).sum(-1).mean()
    expected = (1 - alpha) * ce + alpha * temperature ** 2 * kl
    got = distillation_loss(student, teacher, targets, alpha, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kl_term_is_zero_when_student_is_the_teacher():
    logits = torch.randn(1, 4, 7)
    assert distillation_loss(logits, logits.clone(), torch.zeros(1, 4, dtype=torch.long), 1.0, 3.0).item() \
        == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return distill_env(tmp_path_factory.mktemp("distill"))


def distill_env(root) -> dict:
    """Char data, a random teacher run over its tokenizer (wider than the student), a student TOML."""
    data = prepare_char_data(root, CORPUS)
    vocab = load_tokenizer(data / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(**{**STUDENT_MODEL, "vocab_size": vocab, "d_model": 32}))
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0 if p.dim() == 2 else 1.0)  # peaked distributions: something to learn
    save_run(root / "teacher", teacher.config, load_tokenizer(data / "tokenizer.json"), model_params(teacher))
    return dict(root=root, data=data, teacher=root / "teacher", vocab=vocab)


def student_toml(env, name: str, **changes) -> str:
    top = {**STUDENT, "data_dir": str(env["data"]), "out_dir": str(env["root"] / name), **changes}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()] + ["[model]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in STUDENT_MODEL.items()]
    path = env["root"] / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def kl_to_teacher(env, run) -> float:
    """Mean KL(teacher || student) at T = 1 on a few train windows."""
    teacher = model_from_params(*load_weights(env["teacher"])).eval()
    student = model_from_params(*load_weights(run)).eval()
    x = torch.from_numpy(BatchLoader(env["data"], 32, 8, seed=5).next_batch()[0]).long()
    with torch.no_grad():
        return distillation_loss(student(x), teacher(x), torch.zeros_like(x), 1.0, 1.0).item()


def test_distill_pulls_the_student_towards_the_teacher_and_resumes(env):
    config = student_toml(env, "student", max_steps=1)
    assert cli(["distill", "--teacher", str(env["teacher"]), "--config", config, "--quiet",
                "--set", "alpha=1", "--set", "temperature=1"]) == 0
    start = kl_to_teacher(env, env["root"] / "student")
    assert cli(["distill", "--teacher", str(env["teacher"]), "--config", config, "--quiet", "--resume",
                "--set", "alpha=1", "--set", "temperature=1", "--set", "max_steps=40"]) == 0
    saved = json.loads((env["root"] / "student" / "config.json").read_text())
    assert saved["distill"] == dict(teacher=str(env["teacher"]), alpha=1.0, temperature=1.0, init=None,
                                    teacher_cache=None, top_k=32, cache_dtype="float16")
    rows = (env["root"] / "student" / "metrics.jsonl").read_text().splitlines()
    steps = {json.loads(line)["step"] for line in rows if "train_loss" in line}
    assert sorted(steps) == list(range(1, 41))  # resumed at step 1, not restarted
    assert json.loads(rows[-1])["tokens"] == 40 * 8 * 32
    assert kl_to_teacher(env, env["root"] / "student") < 0.7 * start


def test_recovery_of_a_pruned_student_keeps_its_zeros(env, tmp_path):
    pruned = tmp_path / "pruned"
    assert cli(["prune", "--run", str(env["teacher"]), "--method", "2:4", "--out", str(pruned)]) == 0
    config = student_toml(env, "recovered", max_steps=3, out_dir=str(tmp_path / "recovered"))
    assert cli(["distill", "--teacher", str(env["teacher"]), "--init", str(pruned), "--config", config,
                "--quiet", "--set", "alpha=0.5"]) == 0
    saved = json.loads((tmp_path / "recovered" / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["prune"]["method"] == "2:4"  # the init's shape
    _, before = load_weights(pruned)
    _, after = load_weights(tmp_path / "recovered")
    for n in saved["prune"]["masked"]:
        assert (after[n][before[n] == 0] == 0).all(), n
    assert prune.sparsity_of(after, saved["prune"]["masked"]) == 0.5
    assert any(not np.array_equal(after[n], before[n]) for n in saved["prune"]["masked"])


def test_distill_errors_are_one_line(env, tmp_path, capsys):
    config = student_toml(env, "bad", out_dir=str(tmp_path / "bad"), max_steps=1)
    teacher = ["distill", "--teacher", str(env["teacher"]), "--config", config]
    one_line_error(capsys, [*teacher, "--set", "alpha=2"], "distill alpha must be in [0, 1], got 2.0")
    one_line_error(capsys, [*teacher, "--set", "temperature=x"], "temperature must be a number")
    other = tmp_path / "other"  # a teacher over another tokenizer
    data = prepare_char_data(tmp_path, "abc\n" * 50)
    small = ModelConfig(**{**STUDENT_MODEL, "vocab_size": 8})
    save_run(other, small, load_tokenizer(data / "tokenizer.json"), model_params(Transformer(small)))
    capsys.readouterr()  # prepare's log
    one_line_error(capsys, ["distill", "--teacher", str(other), "--config", config],
                   "is not the tokenizer of the data", "one tokenizer")
    assert cli([*teacher, "--quiet"]) == 0
    one_line_error(capsys, [*teacher, "--resume", "--set", "alpha=0.1"], "was distilled with other settings")
