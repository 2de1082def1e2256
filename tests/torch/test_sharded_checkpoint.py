"""Sharded checkpoints of FSDP runs (minillm.torch.sharded_checkpoint): a rank SIGKILLed mid-run,
then resumed on 2 ranks and on 1 process, continues the loss sequence of a run never killed; a
half-written checkpoint is never picked up; consolidation gives exactly the weights in the shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from minillm.checkpoint import CheckpointError, canonical_shapes, load_config
from minillm.cli import main as cli
from minillm.config import load_train_config
from minillm.torch import sharded_checkpoint
from minillm.train_loop import checkpoint_due
from tests.conftest import prepare_char_data, train_cmd, train_losses

TEXT = "".join(f"{who}: the {what} of {where} doth {verb}.\n"
               for who in ("ROMEO", "JULIET", "LEAR") for what in ("crown", "night", "word")
               for where in ("Verona", "Denmark") for verb in ("bear", "speak", "keep"))

TOML = """
data_dir = "{data}"
out_dir = "{out}"
batch_size = 8
block_size = 16
max_steps = 16
lr = 3e-3
min_lr = 3e-4
warmup_steps = 3
eval_interval = 8
checkpoint_interval = 4
eval_batches = 2
log_interval = 1
seed = 5
dtype = "float32"
[model]
max_seq_len = 16
d_model = 32
n_layers = 2
n_heads = 4
dropout = 0.0
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FSDP = ("--set", 'parallel="fsdp"')


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_char_data(tmp_path_factory.mktemp("data"), TEXT)


def _config(tmp_path, data, out: str):
    p = tmp_path / f"{out}.toml"
    p.write_text(TOML.format(data=data, out=tmp_path / out))
    return p


def _torchrun(config, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "minillm.cli", "train", "--config", str(config), "--quiet", *FSDP, *extra]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the launcher's descendants."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            children = open(f"/proc/{pid}/task/{pid}/children").read().split()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and pid != launcher:
            return pid
        todo += [int(c) for c in children]
    return None


def _kill_rank_at_first_checkpoint(config, state, rank: int = 1) -> None:
    """Start a 2-rank FSDP run; SIGKILL rank `rank` as soon as the first checkpoint is committed
    (its trainer_state.json appears), then the rest of the job, as a crashed node would leave it."""
    proc = subprocess.Popen(_torchrun(config), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        pid = _rank_pid(proc.pid, rank)
        assert pid is not None and proc.poll() is None, "the run ended before it could be killed"
        os.kill(pid, signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stitch(path) -> dict[str, np.ndarray]:
    """The full weights of a sharded checkpoint, put together here from the shard files and the
    offsets in their headers (not through DCP); every element must be covered exactly once."""
    config = load_config(path.parent.parent)
    full = {n: np.zeros(s, np.float32) for n, s in canonical_shapes(config).items()}
    covered = {n: np.zeros(s, np.int64) for n, s in canonical_shapes(config).items()}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                if key.startswith("model."):
                    shard, name = f.get_tensor(key), key[len("model."):]
                    where = tuple(slice(o, o + n) for o, n in zip(offsets[key]["saved_offsets"], shard.shape))
                    full[name][where] = shard
                    covered[name][where] += 1
    assert all((c == 1).all() for c in covered.values())
    return full


def test_kill_a_rank_then_resume_on_two_ranks_and_on_one(tmp_path, data_dir):
    subprocess.run(train_cmd(_config(tmp_path, data_dir, "ref")), check=True, capture_output=True, env=ENV)
    ref = train_losses(tmp_path / "ref")
    config = _config(tmp_path, data_dir, "run")
    run = tmp_path / "run"
    _kill_rank_at_first_checkpoint(config, run / "trainer_state.json")
    killed_at = json.loads((run / "trainer_state.json").read_text())["step"]
    assert killed_at < 16 and (run / "sharded" / "latest").read_text() == f"step-{killed_at:06d}"
    # Half-written checkpoints left behind: a staging directory and a step directory that `latest`
    # does not name, both newer than the committed one and with a truncated shard. Never read.
    for name in ("step-000015", ".staging-step-000015"):
        (run / "sharded" / name).mkdir(exist_ok=True)
        (run / "sharded" / name / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"\x08\0\0")
        (run / "sharded" / name / "trainer_state.json").write_text('{"step": 15}')
    one = tmp_path / "one"
    shutil.copytree(run, one)
    res = subprocess.run(_torchrun(config, "--resume"), capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed {run} at step {killed_at}" in res.stdout
    single = subprocess.run(train_cmd(config, "--resume", "--set", f'out_dir="{one}"', *FSDP),
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for resumed in (run, one):  # the whole sequence, before and after the kill, is the reference's
        losses = train_losses(resumed)
        assert sorted(losses) == list(range(1, 17))
        assert max(abs(losses[s] - ref[s]) for s in ref) < 1e-5, (resumed, losses, ref)
    # the 2-rank run committed step 16 and cleared everything else, the leftovers included
    assert sorted(p.name for p in (run / "sharded").iterdir()) == ["latest", "step-000016"]
    # consolidation: exactly the weights in the shards, and (to fp32 tolerance) the reference's
    stitched = _stitch(run / "sharded" / "step-000016")
    written = load_file(run / "model.safetensors")
    assert cli(["consolidate", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(tmp_path / "export" / "model.safetensors")
    reference = load_file(tmp_path / "ref" / "model.safetensors")
    assert sorted(written) == sorted(exported) == sorted(stitched) == sorted(reference)
    for name in stitched:
        assert np.array_equal(written[name], stitched[name]), name
        assert np.array_equal(exported[name], stitched[name]), name
        np.testing.assert_allclose(stitched[name], reference[name], atol=1e-5, err_msg=name)
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    # the 1-process resume wrote an ordinary single-file resume point and dropped the sharded one
    assert (one / "trainer_state.safetensors").is_file() and not (one / "sharded").exists()


def test_latest_refuses_a_pointer_to_an_incomplete_checkpoint(tmp_path):
    assert sharded_checkpoint.latest(tmp_path) is None
    (tmp_path / "sharded" / "step-000004").mkdir(parents=True)  # shards but no scalars: not committed
    (tmp_path / "sharded" / "latest").write_text("step-000004")
    with pytest.raises(CheckpointError, match="latest names step-000004, which is missing or incomplete"):
        sharded_checkpoint.latest(tmp_path)


def test_consolidate_without_a_sharded_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli(["consolidate", "--run", str(tmp_path)]) == 2
    assert f"{tmp_path}/sharded/latest not found" in capsys.readouterr().err


@pytest.mark.parametrize("step, expected", [(4, True), (8, False), (12, True), (16, False), (5, False)])
def test_the_loop_checkpoints_without_an_eval_exactly_at_these_steps(tmp_path, data_dir, step, expected):
    cfg = load_train_config(_config(tmp_path, data_dir, "run"))  # checkpoint every 4, eval every 8
    assert checkpoint_due(cfg, step) is expected
