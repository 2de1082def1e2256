"""Distillation from a teacher cache (minillm.torch.teacher_cache, `minillm distill --teacher-cache`):
the sparse loss against a float64 formula and, with the whole vocabulary cached, against the
on-the-fly loss; the training windows against the cache's, position by position; reuse, rebuild
and clear errors; exact resume after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.checkpoint import load_weights, save_run
from minillm.cli import main as cli
from minillm.config import load_train_config
from minillm.tokenizer import load_tokenizer
from minillm.torch import teacher_cache
from minillm.torch.distill import distillation_loss, sparse_distillation_loss
from minillm.torch.model import Transformer, model_from_params, model_params
from minillm.torch.teacher_cache import CACHE_FILE, RECORD_FILE, CachedRunData, CachedTargets, GridLoader
from tests.conftest import kill_at_first_checkpoint, train_losses
from tests.torch.conftest import one_line_error
from tests.torch.test_distill import distill_env, kl_to_teacher, student_toml

T = 32  # the students' block_size (test_distill.STUDENT)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return distill_env(tmp_path_factory.mktemp("teacher_cache"))


def teacher_model(env, run=None) -> torch.nn.Module:
    return model_from_params(*load_weights(run or env["teacher"])).eval()


def open_for(env, cache, top_k, temperature=1.0, dtype="float32", teacher=None):
    """The cache of env's teacher (or `teacher`) over env's data, as the trainer opens it."""
    teacher = teacher or teacher_model(env)
    wanted = teacher_cache.wanted_record(env["teacher"], teacher, env["data"], T, top_k, temperature, dtype,
                                         torch.float32)
    return teacher_cache.open_cache(cache, teacher, wanted, batch_size=8, quiet=True)


# --- 1. the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, temperature, k", [(0.5, 2.0, 3), (1.0, 1.0, 1), (0.3, 0.7, 10), (0.2, 1, 4)])
def test_sparse_loss_is_the_kl_over_the_top_k_and_the_rest(alpha, temperature, k):
    """Value and gradient against the formula in float64, differentiated by autograd."""
    g = torch.Generator().manual_seed(0)
    V = 11
    student, teacher = torch.randn(2, 5, V, generator=g) * 3, torch.randn(2, 5, V, generator=g) * 3
    targets = torch.randint(0, V, (2, 5), generator=g)
    targets[0, :2] = -100  # not trained
    # the teacher's side in float64: its k most likely tokens and the mass left to the others
    log_p_all = torch.log_softmax(teacher.double() / temperature, dim=-1)  # (2, 5, V)
    log_p, ids = log_p_all.topk(k, dim=-1)
    p_tail = 1 - log_p.exp().sum(-1)
    cached = CachedTargets(targets, ids, log_p.float(), p_tail.log().float())
    keep = targets != -100
    s = student.double().requires_grad_(True)
    log_q = torch.log_softmax(s[keep] / temperature, dim=-1)  # (N, V)
    log_q_top = log_q.gather(-1, ids[keep])
    q_tail = 1 - log_q_top.exp().sum(-1)
    p = log_p[keep].exp()
    kl = (p * (log_p[keep] - log_q_top)).sum(-1) + p_tail[keep] * (p_tail[keep] / q_tail).log()
    ce = torch.nn.functional.cross_entropy(s[keep], targets[keep])
    expected = (1 - alpha) * ce + alpha * temperature ** 2 * kl.mean()
    expected.backward()
    ours = student.clone().requires_grad_(True)
    got = sparse_distillation_loss(ours, cached, alpha, temperature)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(ours.grad.double(), s.grad, rtol=1e-4, atol=1e-6)
    assert (ours.grad[0, :2] == 0).all()  # untrained positions get no gradient


def test_cache_of_the_whole_vocabulary_gives_the_on_the_fly_loss_and_gradient(env, tmp_path):
    cache = open_for(env, tmp_path / "cache", top_k=env["vocab"], temperature=2.0)
    cfg = load_train_config(student_toml(env, "full-support"))
    x, cached = CachedRunData(cfg, cache).train_batch(torch.device("cpu"))
    assert np.isneginf(cache.log_tail).all()  # nothing is left outside the top-V
    with torch.no_grad():
        teacher = teacher_model(env)(x)  # (B, T, V), the on-the-fly path
    torch.manual_seed(3)
    student = Transformer(cfg.model)(x).detach()
    grads = []
    for loss in (lambda s: sparse_distillation_loss(s, cached, 0.5, 2.0),
                 lambda s: distillation_loss(s, teacher, cached.y, 0.5, 2.0)):
        s = student.clone().requires_grad_(True)
        value = loss(s)
        value.backward()
        grads.append((value.item(), s.grad))
    (cached_loss, cached_grad), (live_loss, live_grad) = grads
    assert cached_loss == pytest.approx(live_loss, abs=1e-5)
    assert torch.isfinite(cached_grad).all() and torch.allclose(cached_grad, live_grad, atol=1e-7)


# --- 2. the windows ---------------------------------------------------------------------------------
def test_training_windows_are_the_cache_windows_position_by_position(env, tmp_path):
    k, temperature = 5, 1.5
    cache = open_for(env, tmp_path / "cache", top_k=k, temperature=temperature)
    tokens = np.fromfile(env["data"] / "train.bin", dtype=np.uint16)  # char data: uint16
    assert cache.record["rows"] == (len(tokens) - 1) // T and cache.record["top_k"] == k
    data = CachedRunData(load_train_config(student_toml(env, "windows")), cache)
    teacher = teacher_model(env)
    for step in range(3):
        rows = data.train.rows(step)
        x, cached = data.train_batch(torch.device("cpu"))
        for i, r in enumerate(rows):  # grid row r is tokens[r*T : (r+1)*T], y one token later
            assert np.array_equal(x[i].numpy(), tokens[r * T : (r + 1) * T])
            assert np.array_equal(cached.y[i].numpy(), tokens[r * T + 1 : (r + 1) * T + 1])
        with torch.no_grad():  # the teacher on these very windows, in float64
            log_p = torch.log_softmax(teacher(x).double() / temperature, dim=-1)  # (B, T, V)
        top = log_p.topk(k, dim=-1)
        assert torch.allclose(cached.log_p.double(), top.values, atol=1e-5)  # per position, best first
        assert torch.allclose(log_p.gather(-1, cached.ids), top.values, atol=1e-5)  # the ids name them
        tail = torch.log1p(-top.values.exp().sum(-1))
        assert torch.allclose(cached.log_tail.double(), tail, atol=1e-4)


def test_grid_rows_are_seeded_per_step_and_split_between_ranks(env):
    one = GridLoader(env["data"], T, 8, seed=4)
    ranks = [GridLoader(env["data"], T, 8, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 7, 3):
        assert np.array_equal(np.concatenate([r.rows(step) for r in ranks]), one.rows(step))
        assert np.array_equal(one.offsets(step), one.rows(step) * T)
    assert not np.array_equal(one.rows(0), one.rows(1))
    rows = np.concatenate([one.rows(s) for s in range(200)])
    assert rows.min() == 0 and rows.max() == one.n_rows - 1  # every row reachable, none past the end


# --- 3. reuse, rebuild, errors ----------------------------------------------------------------------
def test_cache_is_reused_while_its_record_matches_and_rebuilt_when_not(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    open_for(env, cache, top_k=4)
    assert "built in" in capsys.readouterr().err
    stamp = (cache / CACHE_FILE).stat().st_mtime_ns
    open_for(env, cache, top_k=4)
    assert capsys.readouterr().err == "" and (cache / CACHE_FILE).stat().st_mtime_ns == stamp  # reused
    open_for(env, cache, top_k=4, temperature=3.0)
    assert "built with other settings (temperature: 1.0, now 3.0): rebuilding" in capsys.readouterr().err
    assert json.loads((cache / RECORD_FILE).read_text())["temperature"] == 3.0
    other = teacher_model(env)
    with torch.no_grad():
        other.tok_emb.weight.mul_(2)  # the same run's shape, other weights
    open_for(env, cache, top_k=4, temperature=3.0, teacher=other)
    assert "(teacher_sha256: " in capsys.readouterr().err
    saved, rows = load_file(cache / CACHE_FILE), json.loads((cache / RECORD_FILE).read_text())["rows"]
    assert saved["ids"].shape == saved["log_p"].shape == (rows, T, 4) and saved["log_tail"].shape == (rows, T)


def test_bad_cache_and_settings_are_one_line_errors(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    open_for(env, cache, top_k=4)
    config = student_toml(env, "bad", out_dir=str(tmp_path / "bad"), max_steps=1)
    argv = ["distill", "--teacher", str(env["teacher"]), "--config", config, "--quiet", "--teacher-cache",
            str(cache), "--set", "temperature=1", "--set", "cache_dtype=float32"]
    data = (cache / CACHE_FILE).read_bytes()
    (cache / CACHE_FILE).write_bytes(data[: len(data) // 2])
    capsys.readouterr()  # the build's line
    one_line_error(capsys, [*argv, "--set", "top_k=4"], str(cache / CACHE_FILE), "truncated or corrupt")
    record = json.loads((cache / RECORD_FILE).read_text())
    (cache / CACHE_FILE).write_bytes(data)
    (cache / RECORD_FILE).write_text(json.dumps({**record, "rows": record["rows"] - 1}))  # not the data now
    open_for(env, cache, top_k=4)  # the record no longer matches the data: rebuilt
    assert "rebuilding" in capsys.readouterr().err
    one_line_error(capsys, [*argv, "--set", "top_k=0"], "top_k must be a positive integer, got 0")
    one_line_error(capsys, [*argv, "--set", "top_k=2.5"], "top_k must be an integer")
    one_line_error(capsys, [*argv, "--set", f"top_k={env['vocab'] + 1}"],
                   f"top_k must be in [1, teacher vocab_size {env['vocab']}]")
    one_line_error(capsys, [*argv, "--set", "cache_dtype=bfloat16"], "cache_dtype must be one of")
    live = [a for a in argv if a not in ("--teacher-cache", str(cache))]
    one_line_error(capsys, [*live, "--set", "top_k=4"], "top_k is a setting of the teacher cache",
                   "--teacher-cache DIR")


# --- 4. training from the cache ---------------------------------------------------------------------
def test_cached_distill_learns_the_teacher_and_resumes_exactly_after_sigkill(env, tmp_path):
    """N steps straight == k steps, SIGKILL, --resume, N - k steps: same losses, bitwise same weights;
    and the cache pulls the student to the teacher (KL below that of the same student on data alone)."""
    steps, cache = 30, tmp_path / "cache"

    def argv(name: str, alpha: float = 1.0) -> list[str]:
        config = student_toml(env, name, out_dir=str(tmp_path / name), max_steps=steps, checkpoint_interval=4)
        return ["distill", "--teacher", str(env["teacher"]), "--config", config, "--quiet", "--teacher-cache",
                str(cache), "--set", f"alpha={alpha}", "--set", "temperature=1", "--set", "top_k=8"]

    assert cli(argv("straight")) == 0  # builds the cache the others reuse
    proc = subprocess.Popen([sys.executable, "-m", "minillm.cli", *argv("killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "trainer_state.json"
    kill_at_first_checkpoint({"killed": proc}, {"killed": state})
    k = json.loads(state.read_text())["step"]
    assert 0 < k < steps, f"the kill should land mid-run (checkpoint at step {k})"
    assert cli(argv("killed") + ["--resume"]) == 0
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), "loss sequences differ"
    wa, wb = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "killed"))
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())["distill"]
    assert saved["teacher_cache"] == str(cache) and saved["top_k"] == 8
    assert cli(argv("alone", alpha=0.0)) == 0  # the same student and batches, data only
    assert kl_to_teacher(env, tmp_path / "straight") < 0.7 * kl_to_teacher(env, tmp_path / "alone")


def test_a_teacher_with_other_weights_is_not_served_from_the_old_cache(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    open_for(env, cache, top_k=4)
    other = teacher_model(env)
    with torch.no_grad():
        for p in other.parameters():
            p.neg_()
    tokenizer = load_tokenizer(env["data"] / "tokenizer.json")
    save_run(tmp_path / "other", other.config, tokenizer, model_params(other))
    capsys.readouterr()
    config = student_toml(env, "other-teacher", out_dir=str(tmp_path / "student"), max_steps=1)
    assert cli(["distill", "--teacher", str(tmp_path / "other"), "--config", config, "--quiet",
                "--teacher-cache", str(cache), "--set", "temperature=1", "--set", "top_k=4",
                "--set", "cache_dtype=float32"]) == 0
    assert "(teacher_sha256: " in capsys.readouterr().err
    assert json.loads((cache / RECORD_FILE).read_text())["teacher"] == str(tmp_path / "other")
