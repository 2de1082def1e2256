"""The one training loop (minillm.train_loop): first with a scripted trainer (no framework, a fake
clock), then end to end through `minillm train` for both backends: exact resume after SIGKILL,
NaN stop, Ctrl-C / SIGTERM save, a run with no periodic eval or checkpoint."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from minillm import train_loop
from minillm.cli import main as cli
from minillm.config import ModelConfig, TrainConfig
from minillm.train_loop import NonFiniteLoss, run_loop
from minillm.viz.metrics import MetricsLog
from tests.conftest import prepare_char_data, train_cmd, train_losses


class FakeClock:
    """time.perf_counter for the loop: one second per training step, 100 per evaluation."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedTrainer:
    """The train_loop.Trainer protocol with scripted losses; records every save."""

    def __init__(self, tmp_path: Path, clock: FakeClock, losses=None, weights_bad_from: int | None = None,
                 interrupt_at: int | None = None, **cfg):
        base = dict(model=ModelConfig(vocab_size=50), max_steps=10, eval_interval=4, checkpoint_interval=2,
                    log_interval=1, batch_size=2, block_size=8, warmup_steps=0)
        self.cfg = TrainConfig(**{**base, **cfg})
        self.run_dir, self.is_main, self.quiet = tmp_path, True, True
        self.metrics = MetricsLog(tmp_path / "metrics.jsonl")
        self.step, self.tokens, self.elapsed, self.best_val = 0, 0, 0.0, math.inf
        self.clock, self.losses = clock, losses or (lambda step: math.log(50) - 0.01 * step)
        self.weights_bad_from, self.interrupt_at = weights_bad_from, interrupt_at
        self.saves, self.bests, self.evals = [], [], []

    def describe(self) -> str:
        return "training on a script"

    def train_step(self):
        if self.step == self.interrupt_at:
            raise KeyboardInterrupt
        self.clock.t += 1.0
        loss = self.losses(self.step)
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss)
        return loss, 0.5

    def evaluate(self) -> float:
        self.clock.t += 100.0
        self.evals.append(self.step)
        return 3.0 - 0.1 * self.step

    def weights_finite(self) -> bool:
        return self.weights_bad_from is None or self.step < self.weights_bad_from

    def save(self) -> None:
        self.saves.append((self.step, self.best_val, self.elapsed))
        (self.run_dir / "trainer_state.json").write_text(json.dumps({"step": self.step}))

    def save_best(self, val: float) -> None:
        self.best_val = val
        self.bests.append(self.step)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(train_loop.time, "perf_counter", fake)
    monkeypatch.setattr(MetricsLog, "plot", lambda self, png: None)  # matplotlib is not under test here
    return fake


def _rows(t: ScriptedTrainer) -> list[dict]:
    return t.metrics.rows()


def test_eval_and_checkpoint_cadence_and_rows(tmp_path, clock):
    t = ScriptedTrainer(tmp_path, clock)
    summary = run_loop(t)
    assert summary["step"] == 10 and not summary["interrupted"]
    assert t.evals == [4, 8, 10]  # every eval_interval, and always at the end
    # every checkpoint_interval (evals checkpoint too); step 10 twice: its periodic one, then the final eval's
    assert [s for s, _, _ in t.saves] == [2, 4, 6, 8, 10, 10]
    assert t.bests == [4, 8, 10] and t.best_val == pytest.approx(2.0)
    assert t.saves[1][1] == pytest.approx(2.6)  # the resume point records the new best of its eval
    rows = _rows(t)
    train = [r for r in rows if r.get("train_loss") is not None]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert set(train[0]) == {"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "time"}
    assert [r["tokens"] for r in train][:2] == [16, 32]
    evals = [r for r in rows if r.get("val_loss") is not None]
    # evaluations (100 s each on the fake clock) take no training time
    assert [(r["step"], r["time"]) for r in evals] == [(4, 4.0), (8, 8.0), (10, 10.0)]
    assert summary["elapsed"] == pytest.approx(10.0)


@pytest.mark.parametrize("budget,steps", [(dict(max_tokens=40), 3), (dict(max_time=3.5), 4), ({}, 10)])
def test_budget_by_steps_tokens_or_training_time(tmp_path, clock, budget, steps):
    t = ScriptedTrainer(tmp_path, clock, eval_interval=2, **budget)  # evals (100 s each) do not count as time
    assert run_loop(t)["step"] == steps


def test_a_time_budget_decays_to_the_floor_and_ends_at_the_budget(tmp_path, clock):
    """1 s a step on the fake clock, max_time 10 s of max_steps 1000: the wsd decay (last 20%) takes
    seconds 8 to 10; each step's lr follows the training seconds at its end, the last is min_lr."""
    t = ScriptedTrainer(tmp_path, clock, max_time=10.0, max_steps=1000, eval_interval=0, schedule="wsd",
                        decay_frac=0.2, lr=1e-3, min_lr=1e-4)
    summary = run_loop(t)
    rows = [r for r in _rows(t) if r.get("train_loss") is not None]
    assert summary["step"] == 10 and summary["elapsed"] == pytest.approx(10.0)
    # step k ends at k s; its position on the 1000-step axis is 100 k (step 1 knows no step time: 0)
    want = [1e-3] * 8 + [1e-3 + 0.5 * (1e-4 - 1e-3), 1e-4]
    assert [r["lr"] for r in rows] == pytest.approx(want)


def test_a_token_budget_drives_the_decay(tmp_path, clock):
    t = ScriptedTrainer(tmp_path, clock, max_tokens=16 * 10, max_steps=1000, eval_interval=0,
                        lr=1e-3, min_lr=1e-4)  # cosine; 16 tokens a step: 10 steps
    run_loop(t)
    rows = [r for r in _rows(t) if r.get("train_loss") is not None]
    cosine = [1e-4 + 0.5 * (1 + math.cos(math.pi * s / 10)) * 9e-4 for s in range(10)]  # position 100 s
    assert [r["lr"] for r in rows] == pytest.approx(cosine)


def test_step0_flag(tmp_path, clock, capsys):
    run_loop(ScriptedTrainer(tmp_path, clock, max_steps=1))
    out = capsys.readouterr().out
    assert "training on a script" in out and "step 0 loss 3.9120; ln(vocab_size) = 3.9120\n" in out
    run_loop(ScriptedTrainer(tmp_path, clock, max_steps=1, losses=lambda step: 7.0))
    flagged = "step 0 loss 7.0000; ln(vocab_size) = 3.9120  <-- unexpected for an untrained model"
    assert flagged in capsys.readouterr().out


def test_non_finite_loss_stops_naming_the_last_good_checkpoint(tmp_path, clock):
    t = ScriptedTrainer(tmp_path, clock, losses=lambda step: math.nan if step == 5 else 3.0)
    with pytest.raises(SystemExit, match=r"non-finite \(nan\) at step 5.*Last good checkpoint: .*\(step 4\)"):
        run_loop(t)
    assert [s for s, _, _ in t.saves] == [2, 4]


def test_non_finite_weights_are_never_checkpointed(tmp_path, clock):
    t = ScriptedTrainer(tmp_path, clock, weights_bad_from=3)  # finite losses, weights gone bad after step 3
    with pytest.raises(SystemExit, match=r"the weights are not.*\(step 2\)"):
        run_loop(t)
    assert [s for s, _, _ in t.saves] == [2] and t.bests == []


def test_interrupt_saves_and_returns(tmp_path, clock, capsys):
    t = ScriptedTrainer(tmp_path, clock, interrupt_at=3, checkpoint_interval=100, eval_interval=100)
    summary = run_loop(t)
    assert summary["interrupted"] and summary["step"] == 3
    assert t.saves == [(3, math.inf, 3.0)]
    assert "checkpoint saved at step 3" in capsys.readouterr().err


def test_sigterm_is_handled_as_ctrl_c(tmp_path, clock):
    t = ScriptedTrainer(tmp_path, clock, checkpoint_interval=100, eval_interval=100)
    step = t.train_step
    t.train_step = lambda: os.kill(os.getpid(), signal.SIGTERM) if t.step == 2 else step()
    before = signal.getsignal(signal.SIGTERM)
    assert train_loop.train(t)["interrupted"] and t.saves[-1][0] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


# --- end to end, both backends --------------------------------------------------------------------
TEXT = "".join(f"{a} sees {b} by the {c}.\n" for a in ("Anne", "Bob", "Cleo") for b in ("sea", "hill", "moon")
               for c in ("gate", "tower", "river", "bridge")) * 3

TOML = """
data_dir = "{data}"
out_dir = "{out}"
backend = "{backend}"
batch_size = 8
block_size = 16
grad_accum = 2
max_steps = {steps}
lr = 1e-2
warmup_steps = 2
eval_interval = 0
checkpoint_interval = 3
eval_batches = 2
log_interval = 1
seed = 3
[model]
max_seq_len = 16
d_model = 32
n_layers = 1
n_heads = 4
dropout = 0.1
"""
NEEDS_JAX = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
BACKENDS = ["torch", pytest.param("jax", marks=NEEDS_JAX)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_char_data(tmp_path_factory.mktemp("loopdata"), TEXT)


def _config(tmp_path: Path, data: Path, backend: str, steps: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / f"{backend}.toml"
    p.write_text(TOML.format(data=data, out=tmp_path / "run", backend=backend, steps=steps))
    return p




# bf16: autocast, what dtype "auto" picks on CPUs with native bf16
@pytest.mark.parametrize("backend,dtype", [("torch", "float32"), ("torch", "bfloat16"),
                                           pytest.param("jax", "float32", marks=NEEDS_JAX)])
def test_exact_resume_after_sigkill(tmp_path, data_dir, backend, dtype):
    """N steps straight == k steps, SIGKILL, --resume, N-k steps: same losses, bitwise same
    weights. Dropout is on, so the resume must restore the RNG state (JAX: the PRNG key) too."""
    runs = {name: _config(tmp_path / name, data_dir, backend, steps=30) for name in ("straight", "killed")}
    dtype_set = ("--set", f'dtype="{dtype}"')
    subprocess.run(train_cmd(runs["straight"], *dtype_set), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(train_cmd(runs["killed"], *dtype_set), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "run" / "trainer_state.json"
    try:
        deadline = time.time() + 120
        while not state.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
    finally:  # the kill under test, and no training process left behind if the wait fails
        proc.kill()
        proc.wait()
    k = json.loads(state.read_text())["step"]
    assert 0 < k < 30, f"the kill should land mid-run (checkpoint at step {k})"
    subprocess.run(train_cmd(runs["killed"], "--resume", *dtype_set), check=True, capture_output=True,
                   timeout=300)
    a, b = train_losses(tmp_path / "straight" / "run"), train_losses(tmp_path / "killed" / "run")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert all(a[s] == b[s] for s in a), "loss sequences differ"
    from safetensors.numpy import load_file

    wa, wb = (load_file(tmp_path / name / "run" / "model.safetensors") for name in ("straight", "killed"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_loss_stops_with_a_clear_message(tmp_path, data_dir, backend):
    cfg = _config(tmp_path, data_dir, backend, steps=50)
    res = subprocess.run(train_cmd(cfg, "--set", "lr=1e9", "--set", "min_lr=1e9", "--set", "grad_clip=0"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "Last good checkpoint" in res.stderr, res.stderr[-2000:]
    if (tmp_path / "run" / "model.safetensors").exists():
        from safetensors.numpy import load_file

        weights = load_file(tmp_path / "run" / "model.safetensors")
        assert all(np.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_or_sigterm_saves_and_exits_cleanly(tmp_path, data_dir, backend, sig):
    cfg = _config(tmp_path, data_dir, backend, steps=100000)
    proc = subprocess.Popen(train_cmd(cfg, "--set", "checkpoint_interval=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 5) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:  # a failing test leaves no training process behind
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["step"] >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_periodic_eval_or_checkpoint_still_ends_with_both(tmp_path, data_dir, backend):
    cfg = _config(tmp_path, data_dir, backend, steps=5)
    assert cli(["train", "--config", str(cfg), "--quiet", "--set", "eval_interval=0", "--set",
                "checkpoint_interval=0"]) == 0
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["step"] == 5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("val_loss") is not None] == [5]


def test_a_torch_run_with_max_time_ends_at_the_budget_at_min_lr(tmp_path, data_dir):
    """The real trainer and clock: `--set max_time=3` with max_steps far away, warmup-stable-decay:
    the last step runs at min_lr and the run ends within one step of the 3 s (training seconds)."""
    cfg = _config(tmp_path, data_dir, "torch", steps=100000)
    assert cli(["train", "--config", str(cfg), "--quiet", "--set", "max_time=3", "--set", 'schedule="wsd"',
                "--set", "min_lr=1e-4", "--set", "checkpoint_interval=0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("train_loss") is not None]
    assert train[-1]["lr"] == pytest.approx(1e-4, rel=1e-9) and len(train) > 10
    assert max(r["lr"] for r in train) == pytest.approx(1e-2)  # the plateau was reached first
    decaying = [r for r in train if 1e-4 < r["lr"] < 1e-2 - 1e-12 and r["step"] > 2]  # warmup excluded
    assert decaying and decaying[0]["time"] >= 0.75 * 3  # the decay took the end of the time (last 20%)
    step = max(b["time"] - a["time"] for a, b in zip(train[-4:], train[-3:]))  # one step, recently
    assert abs(train[-1]["time"] - 3.0) <= step + 0.05


def test_a_step_slower_than_the_last_past_max_time_still_ends_at_min_lr(tmp_path, data_dir, monkeypatch):
    """A step that takes far longer than the one before (the machine busy) crosses max_time before a
    last step was planned: one more step, planned last, still ends the run at the floor lr."""
    from minillm.torch.train import Trainer

    train_step, started = Trainer.train_step, time.perf_counter()

    def stall_once(self):
        if not getattr(stall_once, "done", False) and time.perf_counter() - started > 1.5:
            stall_once.done = True
            time.sleep(2.0)  # from well before the 2 s budget's end to past it, in one step
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", stall_once)
    cfg = _config(tmp_path, data_dir, "torch", steps=100000)
    assert cli(["train", "--config", str(cfg), "--quiet", "--set", "max_time=2", "--set", 'schedule="wsd"',
                "--set", "min_lr=1e-4", "--set", "checkpoint_interval=0", "--set", "log_interval=1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("train_loss") is not None]
    assert stall_once.done and train[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)
