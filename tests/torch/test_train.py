"""End-to-end PyTorch training: clear errors, step-0 loss, run directory, DDP, and one Trainer step
against a stand-alone AdamW (the loop itself, exact resume after SIGKILL included, for both
frameworks: tests/test_train_loop.py)."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.cli import main as cli
from minillm.config import load_train_config
from minillm.schedule import lr_at
from minillm.torch.model import next_token_loss
from minillm.torch.train import Trainer, resolve_dtype
from tests.conftest import prepare_char_data, train_cmd, train_losses

TEXT = "".join(
    f"{name}:\nI pray thee, {verb} the {noun} of {place}; for thus the {noun} doth {verb}.\n\n"
    for name in ("ROMEO", "JULIET", "HAMLET", "OPHELIA", "LEAR")
    for verb in ("bear", "mark", "keep", "speak")
    for noun in ("crown", "heart", "night", "word")
    for place in ("Verona", "Denmark", "Britain")
)

TOML = """
data_dir = "{data}"
out_dir = "{out}"
batch_size = 8
block_size = 32
grad_accum = 2
max_steps = {steps}
lr = 3e-3
min_lr = 3e-4
warmup_steps = 5
schedule = "cosine"
eval_interval = 0
checkpoint_interval = 3
eval_batches = 2
log_interval = 1
seed = 7
[model]
max_seq_len = 32
d_model = 32
n_layers = 2
n_heads = 4
dropout = 0.1
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_char_data(tmp_path_factory.mktemp("data"), TEXT)


def _config(tmp_path: Path, data: Path, out: str, steps: int = 40) -> Path:
    p = tmp_path / f"{out}.toml"
    p.write_text(TOML.format(data=data, out=tmp_path / out, steps=steps))
    return p




def test_run_directory_and_step0_loss(tmp_path, data_dir, capsys):
    cfg = _config(tmp_path, data_dir, "run", steps=8)
    assert cli(["train", "--config", str(cfg), "--quiet", "--set", "eval_interval=4"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for name in ("config.json", "tokenizer.json", "model.safetensors", "trainer_state.json",
                 "trainer_state.safetensors", "metrics.jsonl", "loss.png", "best/model.safetensors"):
        assert (run / name).is_file(), name
    vocab = json.loads((run / "config.json").read_text())["model"]["vocab_size"]
    step0 = float(out.split("step 0 loss ")[1].split(";")[0])
    assert abs(step0 - math.log(vocab)) < 0.1
    resolved = resolve_dtype(torch.device("cpu"), "auto")
    # it says what "auto" chose
    assert ("in float32" if resolved == torch.float32 else "in bfloat16 autocast") in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("val_loss") for r in rows)
    assert {"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "time"} <= set(rows[0])


def test_bad_checkpoints_are_refused_without_touching_files(tmp_path, data_dir, capsys):
    cfg = _config(tmp_path, data_dir, "run", steps=4)
    assert cli(["train", "--config", str(cfg), "--quiet"]) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # another architecture
    assert cli(["train", "--config", str(cfg), "--quiet", "--resume", "--set", "model.n_layers=3"]) == 2
    assert "another architecture" in capsys.readouterr().err
    # a tokenizer that does not match the data
    other = tmp_path / "other.txt"
    other.write_text("completely different alphabet: xyz 0123456789 QWERTY\n" * 40, encoding="utf-8")
    assert cli(["prepare", "--source", str(other), "--tokenizer", "char", "--out", str(tmp_path / "d2")]) == 0
    other_data = f'data_dir="{tmp_path / "d2"}"'
    assert cli(["train", "--config", str(cfg), "--quiet", "--resume", "--set", other_data]) == 2
    assert "tokenizer" in capsys.readouterr().err
    # a truncated trainer state
    state = run / "trainer_state.safetensors"
    state.write_bytes(before["trainer_state.safetensors"][:1000])
    assert cli(["train", "--config", str(cfg), "--quiet", "--resume"]) == 2
    assert "truncated" in capsys.readouterr().err
    state.write_bytes(before["trainer_state.safetensors"])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "nowhere", "run", steps=4)
    assert cli(["train", "--config", str(cfg)]) == 2
    assert "prepare the data first" in capsys.readouterr().err


def test_torchrun_two_ranks_match_one_process(tmp_path, data_dir):
    """DDP over 2 CPU ranks (gloo) takes the same steps as one process: the batch is global."""
    single = _config(tmp_path, data_dir, "single", steps=6)
    ddp = _config(tmp_path, data_dir, "ddp", steps=6)
    # fp32: for the tolerance
    common = ["--set", "model.dropout=0.0", "--set", "eval_interval=3", "--set", 'dtype="float32"']
    subprocess.run(train_cmd(single, *common), check=True, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minillm.cli", "train", "--config", str(ddp), "--quiet", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    wa, wb = (load_file(tmp_path / run / "model.safetensors") for run in ("single", "ddp"))
    assert all(np.allclose(wa[n], wb[n], atol=1e-5) for n in wa)


def test_trainer_steps_equal_adamw_with_explicit_groups_schedule_and_clipping(tmp_path, data_dir):
    """Four Trainer.train_step calls == a stand-alone torch.optim.AdamW built here: explicit decay
    groups (matrices decay; embeddings, norm gains, biases do not), lr_at(step) during warmup
    (never cfg.lr), clip_grad_norm_ with a clip far below the gradient norm, strong weight decay."""
    cfg = load_train_config(_config(tmp_path, data_dir, "ref"), [
        "model.dropout=0.0", "model.bias=true", 'dtype="float32"', "grad_clip=1e-4", "weight_decay=0.5",
        "eps=1e-6"])  # grad_clip: clipped gradients ~ eps, so skipping the clip changes Adam's update
    trainer = Trainer(cfg, quiet=True)
    ref = copy.deepcopy(trainer.model)
    named = dict(ref.named_parameters())
    no_decay = [n for n, p in named.items() if p.dim() < 2 or n in ("tok_emb.weight", "pos_emb.weight")]
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)
    decay = [p for n, p in named.items() if n not in no_decay]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5},
                             {"params": [named[n] for n in no_decay], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    batches = [trainer.data.train_batch(trainer.device) for _ in range(4 * cfg.grad_accum)]
    feed = iter(batches)
    trainer.data.train_batch = lambda device: next(feed)
    for step in range(4):
        loss, grad_norm = trainer.train_step()
        trainer.step += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        assert lr_at(step, cfg) < 0.8 * cfg.lr  # warmup: the schedule matters
        ref_loss = 0.0
        for x, y in batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]:
            micro = next_token_loss(ref(x), y) / cfg.grad_accum
            micro.backward()
            ref_loss += micro.item()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip).item()
        opt.step()
        opt.zero_grad()
        assert ref_norm > 100 * cfg.grad_clip  # clipping is active
        assert loss == pytest.approx(ref_loss, abs=1e-6) and grad_norm == pytest.approx(ref_norm, rel=1e-5)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, named[name], atol=1e-6, rtol=1e-5, msg=name)
