"""The `minillm` entry point: help for every command, inspect, clean errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from minillm.cli import build_parser, main

NANOGPT_CPU = str(Path(__file__).resolve().parent.parent / "configs" / "nanogpt-cpu.toml")


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "inspect"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: minillm " + name in capsys.readouterr().out


def test_inspect_counts_match_the_model(capsys):
    assert main(["inspect", "--preset", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out


def test_inspect_training_config(capsys):
    assert main(["inspect", "--config", NANOGPT_CPU, "--set", "model.vocab_size=65"]) == 0
    out = capsys.readouterr().out
    assert "tokens per step   768" in out and "activations" in out


def test_bad_override_is_a_clean_error(capsys):
    assert main(["inspect", "--config", NANOGPT_CPU, "--set", "model.d_modl=3"]) == 2
    err = capsys.readouterr().err
    assert "d_modl" in err and "Traceback" not in err
    assert main(["inspect", "--config", "configs/missing.toml"]) == 2


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "minillm.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "prepare data, train" in out.stdout
