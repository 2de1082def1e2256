"""`minillm train --backend jax`: the PyTorch trainer's run directory format, exact resume, and
greedy samples equal across frameworks for a model trained by either one."""

import json
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from minillm.checkpoint import load_run  # noqa: E402
from minillm.cli import main as cli  # noqa: E402
from minillm.config import load_train_config  # noqa: E402
from minillm.jax import generate as jg  # noqa: E402
from minillm.jax import model as jm  # noqa: E402
from minillm.jax.train import Trainer  # noqa: E402
from minillm.torch.generate import generate as torch_generate  # noqa: E402
from minillm.torch.model import load_model as torch_load_model  # noqa: E402
from minillm.train_loop import train  # noqa: E402
from tests.conftest import prepare_char_data  # noqa: E402

CORPUS = "".join(f"{a} sees {b} by the {c}.\n" for a in ("Anne", "Bob", "Cleo")
                 for b in ("sea", "hill", "moon") for c in ("gate", "tower", "river", "bridge")) * 3

TOML = """
data_dir = "{data}"
out_dir = "{out}"
batch_size = 8
block_size = 16
grad_accum = 2
max_steps = 12
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
eval_interval = 6
eval_batches = 2
log_interval = 1
seed = 3
[model]
max_seq_len = 32
d_model = 32
n_layers = 1
n_heads = 4
n_kv_heads = 2
norm = "rmsnorm"
positions = "rope"
mlp = "swiglu"
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_char_data(tmp_path_factory.mktemp("jaxdata"), CORPUS)


def _config(tmp_path, data_dir, out: str):
    path = tmp_path / f"{out}.toml"
    path.write_text(TOML.format(data=data_dir, out=tmp_path / out))
    return path


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_and_both_frameworks_sample_it_alike(tmp_path, data_dir, capsys):
    config = str(_config(tmp_path, data_dir, "jaxrun"))
    assert cli(["train", "--config", config, "--backend", "jax", "--quiet"]) == 0
    run = tmp_path / "jaxrun"
    for name in ("config.json", "tokenizer.json", "model.safetensors", "trainer_state.json",
                 "trainer_state.safetensors", "metrics.jsonl", "loss.png", "best/model.safetensors"):
        assert (run / name).is_file(), name
    rows = _rows(run)
    train_rows = [r for r in rows if r.get("train_loss") is not None]
    assert {"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "time"} <= set(train_rows[0])
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert sum(r.get("val_loss") is not None for r in rows) == 2
    vocab = json.loads((run / "config.json").read_text())["model"]["vocab_size"]
    step0 = float(capsys.readouterr().out.split("step 0 loss ")[1].split(";")[0])
    assert abs(step0 - math.log(vocab)) < 0.1
    assert train_rows[-1]["train_loss"] < step0 - 0.5  # it learned
    _assert_same_greedy(run)
    # `minillm sample` (PyTorch) prints what the JAX sampler returns, greedy and with a stop string.
    args = ["sample", "--run", str(run), "--prompt", "Bob", "--temperature", "0", "--max-new-tokens", "24"]
    assert cli(args) == 0
    assert capsys.readouterr().out == "Bob" + jg.sample_texts(run, "Bob", 1, 24, temperature=0)[0] + "\n"
    cut = jg.sample_texts(run, "Bob", 2, 24, temperature=0, stop_strings=["e"])
    assert cut[0] == cut[1] and "e" not in cut[0]
    # and `minillm sample --backend jax` prints the same as the PyTorch sampler
    assert cli(args) == 0
    torch_out = capsys.readouterr().out
    assert cli(args + ["--backend", "jax"]) == 0
    assert capsys.readouterr().out == torch_out
    beams = ["--num-beams", "3", "--max-new-tokens", "12"]  # beam search: the same on both backends
    assert cli(args + beams) == 0
    torch_beam = capsys.readouterr().out
    assert cli(args + beams + ["--backend", "jax"]) == 0
    assert capsys.readouterr().out == torch_beam
    assert cli(args + ["--backend", "jax", "--stream"]) == 2  # unsupported there: a clear error


def test_torch_trained_model_samples_identically_in_jax(tmp_path, data_dir):
    config = str(_config(tmp_path, data_dir, "torchrun"))
    assert cli(["train", "--config", config, "--backend", "torch", "--quiet"]) == 0
    _assert_same_greedy(tmp_path / "torchrun")
    # The trainer states share one format: JAX resumes the PyTorch run (weights and AdamW moments).
    last_torch = [r for r in _rows(tmp_path / "torchrun") if r.get("train_loss") is not None][-1]
    resume = ["train", "--config", config, "--backend", "jax", "--resume", "--quiet", "--set", "max_steps=14"]
    assert cli(resume) == 0
    resumed = [r for r in _rows(tmp_path / "torchrun") if r.get("train_loss") is not None]
    assert [r["step"] for r in resumed][-3:] == [12, 13, 14]
    # continues where torch stopped, not from scratch
    assert abs(resumed[-2]["train_loss"] - last_torch["train_loss"]) < 0.3
    # and back: PyTorch resumes the state the JAX trainer wrote
    back = ["train", "--config", config, "--backend", "torch", "--resume", "--quiet", "--set", "max_steps=16"]
    assert cli(back) == 0
    rows = [r for r in _rows(tmp_path / "torchrun") if r.get("train_loss") is not None]
    assert [r["step"] for r in rows][-4:] == [13, 14, 15, 16]
    assert abs(rows[-2]["train_loss"] - resumed[-1]["train_loss"]) < 0.3


def _assert_same_greedy(run):
    """The run's model, loaded by each framework from the same files, continues a prompt alike."""
    config, tokenizer, flat = load_run(run)
    prompt = tokenizer.encode("Anne sees")
    jax_out = jg.generate(jm.params_from_canonical(flat, config), config, prompt, 20, temperature=0)
    model, _ = torch_load_model(run)
    assert jax_out == torch_generate(model, prompt, 20, temperature=0)


def test_exact_resume(tmp_path, data_dir):
    """12 steps straight == 6 steps (stopped by a Ctrl-C, which saves), then --resume to 12: same
    losses, same weights. Dropout is on, so the resume must restore the PRNG key too, not only
    weights and AdamW. (A smaller budget would not do: budgets drive the learning-rate schedule.)"""
    dropout = ["model.dropout=0.1"]
    straight = load_train_config(_config(tmp_path, data_dir, "straight"), dropout)
    train(Trainer(straight, quiet=True))
    cut = Trainer(load_train_config(_config(tmp_path, data_dir, "cut"), dropout), quiet=True)
    step = cut.train_step

    def ctrl_c_at_step_6():
        if cut.step == 6:
            raise KeyboardInterrupt
        return step()

    cut.train_step = ctrl_c_at_step_6
    assert train(cut)["step"] == 6
    resumed = load_train_config(_config(tmp_path, data_dir, "cut"), dropout)
    assert train(Trainer(resumed, resume=True, quiet=True))["step"] == 12
    losses = lambda run: {r["step"]: r["train_loss"] for r in _rows(run) if r.get("train_loss") is not None}  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "cut")
    _, _, a = load_run(tmp_path / "straight")
    _, _, b = load_run(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)
