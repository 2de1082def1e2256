"""`minillm sweep` and `minillm compare` on tiny char-level runs (a few steps each): each point is the
run `minillm train` makes, the results table is the runs' own metrics.jsonl, a second call trains
nothing, Ctrl-C keeps finished points and the cut point resumes exactly."""

from __future__ import annotations

import json

import pytest

from minillm import sweep
from minillm.checkpoint import load_config
from minillm.cli import main as cli
from minillm.torch.model import Transformer
from tests.conftest import prepare_char_data, train_losses
from tests.torch.conftest import CORPUS

TINY = dict(batch_size=8, block_size=32, max_steps=6, lr=1e-2, warmup_steps=2, eval_interval=3,
            eval_batches=1, log_interval=1, seed=1, dtype="float32", threads=1)
TINY_MODEL = dict(max_seq_len=32, n_layers=1, n_heads=2, norm="rmsnorm", positions="rope", mlp="swiglu")
AXIS = "model.d_model=[16,32]"
NAMES = ["model.d_model=16", "model.d_model=32"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Prepared data, the tiny config, and one finished two-point sweep (its --json stdout kept)."""
    root = tmp_path_factory.mktemp("sweep")
    data = prepare_char_data(root, CORPUS)
    toml = [f"{k} = {json.dumps(v)}" for k, v in {**TINY, "data_dir": str(data)}.items()] + ["[model]"]
    toml += [f"{k} = {json.dumps(v)}" for k, v in TINY_MODEL.items()]
    (root / "tiny.toml").write_text("\n".join(toml) + "\n")
    return dict(root=root, config=root / "tiny.toml", out=root / "sw")


def sweep_args(env, out, *extra: str) -> list[str]:
    return ["sweep", "--config", str(env["config"]), "--set", AXIS, "--out", str(out), "--quiet", *extra]


def metric_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first(env) -> dict:
    """The sweep run once with --json; stdout captured by hand (capsys is per test)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(sweep_args(env, env["out"], "--json")) == 0
    return json.loads(buf.getvalue())  # stdout is one JSON object, nothing else


def test_results_table_is_the_runs_own_metrics(env, first):
    assert [p["name"] for p in first["points"]] == NAMES and first["total"] == 2
    assert not first["interrupted"]
    assert json.loads((env["out"] / "results.json").read_text()) == first
    for point, d_model in zip(first["points"], (16, 32)):
        run = env["out"] / point["name"]
        rows = metric_rows(run)
        vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        trains = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
        assert point["values"] == {"model.d_model": d_model} and load_config(run).d_model == d_model
        assert (point["steps"], point["tokens"]) == (6, 6 * 8 * 32)
        assert point["val_loss"] == vals[-1] and point["best_val"] == min(vals) and len(vals) == 2
        assert point["train_loss"] == trains[-1] and point["time"] == rows[-1]["time"] > 0
        assert point["params"] == Transformer(load_config(run)).num_parameters()
    png = (env["out"] / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_a_point_is_the_run_minillm_train_makes(env, first):
    solo = env["root"] / "solo"
    assert cli(["train", "--config", str(env["config"]), "--quiet", "--set", "model.d_model=32",
                "--set", f"out_dir={json.dumps(str(solo))}"]) == 0
    point = env["out"] / NAMES[1]
    assert train_losses(point) == train_losses(solo)
    assert [r.get("val_loss") for r in metric_rows(point)] == [r.get("val_loss") for r in metric_rows(solo)]
    assert (point / "model.safetensors").read_bytes() == (solo / "model.safetensors").read_bytes()


def test_second_call_trains_nothing(env, first, capsys):
    files = [env["out"] / name / f for name in NAMES for f in ("model.safetensors", "trainer_state.json")]
    before = [f.stat().st_mtime_ns for f in files]
    assert cli(sweep_args(env, env["out"])) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: finished before, not rerun" in out for name in NAMES), out
    assert [f.stat().st_mtime_ns for f in files] == before
    table = out.splitlines()[2:]  # after the two progress lines
    assert table[0].split() == ["point", "params", "tokens", "time", "(s)", "train", "loss", "val", "loss"]
    assert table[2].startswith(NAMES[0]) and f"{first['points'][0]['val_loss']:.4f}" in table[2]


def test_ctrl_c_keeps_finished_points_and_the_cut_one_resumes(env, first, monkeypatch, capsys):
    out, real = env["root"] / "cut", sweep.make_trainer

    def interrupting(cfg, resume, quiet):  # Ctrl-C during the third step of the second point
        trainer = real(cfg, resume, quiet)
        step = trainer.train_step

        def train_step():
            if cfg.model.d_model == 32 and trainer.step == 2:
                raise KeyboardInterrupt
            return step()

        trainer.train_step = train_step
        return trainer

    monkeypatch.setattr(sweep, "make_trainer", interrupting)
    assert cli(sweep_args(env, out)) == 130
    report = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in report["points"]] == NAMES[:1] and report["interrupted"]
    assert json.loads((out / NAMES[1] / "trainer_state.json").read_text())["step"] == 2
    finished = (out / NAMES[0] / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(sweep, "make_trainer", real)
    capsys.readouterr()
    assert cli(sweep_args(env, out)) == 0
    said = capsys.readouterr().out
    assert f"{NAMES[0]}: finished before, not rerun" in said and f"{NAMES[1]}: resuming" in said, said
    assert (out / NAMES[0] / "model.safetensors").stat().st_mtime_ns == finished
    assert train_losses(out / NAMES[1]) == train_losses(env["out"] / NAMES[1])  # resumed exactly
    assert [p["val_loss"] for p in json.loads((out / "results.json").read_text())["points"]] == \
        [p["val_loss"] for p in first["points"]]


def test_compare_draws_the_runs_and_prints_their_final_losses(env, first, capsys):
    runs = [str(env["out"] / name) for name in NAMES]
    png = env["root"] / "compare.png"
    assert cli(["compare", *runs, "--out", str(png), "--x", "step", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the legend: each directory name, then the other settings that differ (d_ff follows d_model)
    assert [r["label"] for r in report["runs"]] == [f"{NAMES[0]} (d_ff=64)", f"{NAMES[1]} (d_ff=128)"]
    for row, point in zip(report["runs"], first["points"]):
        assert (row["val_loss"], row["train_loss"], row["steps"]) == \
            (point["val_loss"], point["train_loss"], point["steps"])
    assert png.read_bytes().startswith(b"\x89PNG")
    assert cli(["compare", *runs, "--out", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("model.d_model=16 (d_ff=64)") and lines[-1] == f"figure: {png}"
