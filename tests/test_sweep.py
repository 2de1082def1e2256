"""minillm.sweep (the grid, point names, the plan and its errors), minillm.results (a run's final
numbers from its own files) and the one-line errors of `minillm sweep` / `minillm compare`, all
without training: the runs here are hand-written run directories with literal metrics."""

from __future__ import annotations

import json

import pytest

from minillm import results, sweep
from minillm.cli import main as cli
from minillm.config import ModelConfig

TOML = """data_dir = "nowhere"
out_dir = "runs/ignored"
max_steps = 50
lr = 2e-3
[model]
vocab_size = 65
d_model = 32
n_heads = 4
n_layers = 2
max_seq_len = 64
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    return path


def test_grid_is_the_cartesian_product_in_set_order():
    axes, fixed = sweep.parse_axes(["model.d_model=[64,128,256]", "lr=[1e-3,3e-3]", "max_time=20",
                                    'schedule="wsd"'])
    assert axes == {"model.d_model": [64, 128, 256], "lr": [0.001, 0.003]}
    assert fixed == ["max_time=20", 'schedule="wsd"']
    assert sweep.expand(axes) == [
        {"model.d_model": 64, "lr": 0.001}, {"model.d_model": 64, "lr": 0.003},
        {"model.d_model": 128, "lr": 0.001}, {"model.d_model": 128, "lr": 0.003},
        {"model.d_model": 256, "lr": 0.001}, {"model.d_model": 256, "lr": 0.003}]
    assert sweep.expand({}) == [{}]  # no axis: one run with the fixed values


def test_point_names():
    assert sweep.point_name({"model.d_model": 64, "lr": 0.001}) == "model.d_model=64,lr=0.001"
    assert sweep.point_name({"lr": 1e-5, "model.bias": True}) == "lr=1e-05,model.bias=true"
    assert sweep.point_name({"schedule": "wsd", "data_dir": "data/a"}) == "schedule=wsd,data_dir=data_a"
    assert sweep.point_name({}) == "default"


def test_plan_builds_each_point_as_train_would(config, tmp_path):
    points = sweep.plan(config, ["model.d_model=[16,64]", "lr=[0.01]", "max_steps=7"], tmp_path / "sw")
    assert [p.name for p in points] == ["model.d_model=16,lr=0.01", "model.d_model=64,lr=0.01"]
    assert [p.cfg.model.d_model for p in points] == [16, 64]
    assert [p.cfg.model.d_ff for p in points] == [64, 256]  # the default 4 * d_model follows the axis
    assert {(p.cfg.lr, p.cfg.max_steps, p.cfg.model.n_layers) for p in points} == {(0.01, 7, 2)}
    assert [p.cfg.out_dir for p in points] == [str(tmp_path / "sw" / p.name) for p in points]


@pytest.mark.parametrize("sets, needles", [
    (["model.d_model=[]"], ["model.d_model=[]", "empty list"]),
    (["model.d_model=[64,128"], ["model.d_model=[64,128", "not a valid list"]),
    (["lr=[1e-3,,3e-3]"], ["lr=[1e-3,,3e-3]", "not a valid list"]),
    (["model.d_modle=[64,128]"], ["d_modle"]),
    (["learning_rate=[1e-3]"], ["learning_rate"]),
    (["model.d_model=[64,30]"], ["model.d_model=30", "d_model"]),  # 30 heads of 4: not divisible
    (["model.d_model=[64,\"big\"]"], ["big"]),
    (["out_dir=x"], ["out_dir"]),
    (["lr=[1e-3]", "lr=1e-2"], ["lr", "twice"]),
    (["nokey"], ["nokey", "key=value"]),
])
def test_bad_input_is_one_line_naming_key_or_value(config, tmp_path, capsys, sets, needles):
    out = tmp_path / "sw"
    args = ["sweep", "--config", str(config), "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm sweep: error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err
    assert not out.exists()  # nothing trained, nothing written


# --- hand-written runs ---------------------------------------------------------------------------------
MODEL = dict(vocab_size=10, max_seq_len=16, d_model=8, n_layers=1, n_heads=2, bias=True)
ROWS = [dict(step=1, tokens=64, train_loss=2.5, lr=1e-3, time=0.5),
        dict(step=2, tokens=128, train_loss=2.25, lr=1e-3, time=1.0),
        dict(step=2, tokens=128, val_loss=2.4, train_loss=None, time=1.0),
        dict(step=4, tokens=256, train_loss=2.0, lr=1e-3, time=2.0),
        dict(step=4, tokens=256, val_loss=2.45, train_loss=None, time=2.25)]


def write_run(path, rows=ROWS, **train):
    path.mkdir(parents=True)
    config = {"model": ModelConfig(**MODEL).to_dict(), "train": {"lr": 1e-3, "out_dir": str(path), **train},
              "data": {"vocab_size": 10}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_summary_reads_the_runs_own_metrics(tmp_path):
    run = write_run(tmp_path / "r")
    # tok_emb 10*8 (tied) + pos_emb 16*8 + 2 LayerNorms 2*16 + q,k,v,o 4*(8*8+8) + up 8*32+32 + down 32*8+8
    # + final LayerNorm 16 = 1096 (torch's Transformer.num_parameters agrees: tests/torch/test_sweep_cli.py)
    assert results.summarize(run) == dict(run=str(run), params=1096, steps=4, tokens=256, time=2.25,
                                          train_loss=2.0, val_loss=2.45, best_val=2.4)
    cut = write_run(tmp_path / "cut", ROWS[:2])  # no evaluation yet
    assert results.summarize(cut)["val_loss"] is None and results.summarize(cut)["train_loss"] == 2.25


def test_differing_settings_and_table(tmp_path):
    a, b = write_run(tmp_path / "a", lr=1e-3), write_run(tmp_path / "b", lr=3e-3)
    assert results.differing_settings([a, b]) == [{"train.lr": 0.001}, {"train.lr": 0.003}]  # not out_dir
    assert results.differing_settings([a]) == [{}]
    rows = [dict(name="x", params=1096, time=2.25, val_loss=2.45), dict(name="long name", val_loss=None)]
    assert results.table(rows, [("name", "run"), ("params", "params"), ("time", "s", ".1f"),
                                ("val_loss", "val")]).splitlines() == [
        "run        params  s    val",
        "---------  ------  ---  ------",
        "x          1,096   2.2  2.4500",
        "long name  -       -    -"]


def test_point_state_refuses_a_directory_trained_otherwise(config, tmp_path):
    (point,) = sweep.plan(config, ["model.d_model=[32]"], tmp_path / "sw")
    assert sweep.point_state(point, set()) == "new"
    run = tmp_path / "sw" / point.name
    run.mkdir(parents=True)
    same = {"model": point.cfg.model.to_dict(), "train": {k: v for k, v in point.cfg.to_dict().items()
                                                         if k != "model"}}
    (run / "config.json").write_text(json.dumps({**same, "train": {**same["train"], "out_dir": "moved"}}))
    assert sweep.point_state(point, {point.name}) == "done"  # listed in results.json: not rerun
    assert sweep.point_state(point, set()) == "new"  # no checkpoint of it
    (run / "trainer_state.json").write_text("{}")
    assert sweep.point_state(point, set()) == "resume"
    (run / "config.json").write_text(json.dumps({**same, "train": {**same["train"], "lr": 0.5}}))
    with pytest.raises(ValueError, match=r"trained with other settings \(train.lr: 0.5 there, 0.002 now\)"):
        sweep.point_state(point, {point.name})


@pytest.mark.parametrize("make, needles", [
    (lambda p: p / "absent", ["run directory not found", "absent"]),
    (lambda p: (p / "empty").mkdir() or p / "empty", ["empty", "not a run directory"]),
    (lambda p: write_run(p / "fresh", []), ["fresh", "no metrics"]),
])
def test_compare_errors(tmp_path, capsys, make, needles):
    good = write_run(tmp_path / "good")
    assert cli(["compare", str(good), str(make(tmp_path)), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm compare: error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "c.png").exists()
