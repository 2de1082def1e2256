"""`minillm train --backend jax` as 2 processes on localhost (jax.distributed, CPU, gloo collectives):
the same losses as 1 process on the same global batch, with the state replicated ("ddp") or
sharded ("fsdp"), one run directory in the usual format, and resume from it on 2 processes or 1."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("jax")
pytest.importorskip("optax")

from tests.conftest import prepare_char_data, train_cmd, train_losses  # noqa: E402

CORPUS = "".join(f"{a} sees {b} by the {c}.\n" for a in ("Anne", "Bob", "Cleo")
                 for b in ("sea", "hill", "moon") for c in ("gate", "tower", "river", "bridge")) * 3

TOML = """
data_dir = "{data}"
out_dir = "{out}"
backend = "jax"
dtype = "float32"
batch_size = 8
block_size = 16
grad_accum = 2
max_steps = 50
lr = 1e-2
min_lr = 1e-3
warmup_steps = 5
# constant after warmup: the cut below is a token budget, and a budget that binds drives the decay
schedule = "constant"
eval_interval = 25
checkpoint_interval = 10
eval_batches = 2
log_interval = 1
seed = 3
[model]
max_seq_len = 16
d_model = 32
n_layers = 1
n_heads = 4
n_kv_heads = 2
norm = "rmsnorm"
positions = "rope"
mlp = "swiglu"
dropout = 0.1
"""
STEPS_PER_CUT = 20
TOKENS_PER_STEP = 8 * 16
TOLERANCE = 1e-5  # fp32, reductions in another order over 50 AdamW steps (seen: 5e-7)
TIMEOUT = 300  # s per run: generous, for a loaded machine


def _env(cache: Path, **extra: str) -> dict[str, str]:
    """One CPU device per process, XLA and numpy on one thread each (two processes share 2 cores),
    and a compilation cache for the later runs (jax writes it from process 0 only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", **extra,
            "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config, n_processes: int, *extra: str) -> list[str]:
    """Run `minillm train` as n_processes JAX processes; returns each process's stdout."""
    cmd, cache = train_cmd(config, *extra), Path(config).parent / "jax-cache"
    address = f"127.0.0.1:{_free_port()}"
    launch = lambda i: dict(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n_processes),  # noqa: E731
                            JAX_PROCESS_ID=str(i)) if n_processes > 1 else {}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(cache, **launch(i))) for i in range(n_processes)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:  # e.g. one process died and the other waits for it
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    return [out for out, _ in outs]


def _config(root, name: str):
    path = root / f"{name}.toml"
    path.write_text(TOML.format(data=root / "char", out=root / name))
    return path


def _same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    a = {s: a[s] for s in steps if s in a}
    assert sorted(a) == sorted(b) == list(steps), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < TOLERANCE, (worst, a, b)


def _same_weights(run_a, run_b) -> None:
    wa, wb = (load_file(run / "model.safetensors") for run in (run_a, run_b))
    assert sorted(wa) == sorted(wb)
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst < 5e-5, worst  # seen: 6e-6


def test_two_processes_match_one_and_resume_on_two_or_one(tmp_path):
    """50 steps on 1 process, the reference. Then 2 processes, fsdp (weights and AdamW moments
    sharded over the 2 processes' devices), cut at step 20; the run directory resumed on the 2
    processes with ddp (replicated: the files do not depend on the strategy) to step 50 and, in a
    copy, on 1 process. Every loss, 1 to 50, and the final weights equal the reference's: the same
    global batches, the same updates, the same resume point."""
    root = tmp_path
    prepare_char_data(root, CORPUS)
    single, cut = root / "single", root / "cut"
    train(_config(root, "single"), 1)
    fsdp = ["--set", 'parallel="fsdp"']
    outs = train(_config(root, "cut"), 2, *fsdp, "--set", f"max_tokens={STEPS_PER_CUT * TOKENS_PER_STEP}")
    _same_losses(train_losses(single), train_losses(cut), range(1, STEPS_PER_CUT + 1))
    # process 0 alone writes: one metrics row per step, the step-0 line once, the usual files
    assert sum("step 0 loss" in out for out in outs) == 1
    assert "2 devices of 2 process(es), parameters sharded (parallel = 'fsdp')" in outs[0]
    for name in ("config.json", "tokenizer.json", "trainer_state.json", "trainer_state.safetensors",
                 "best/model.safetensors", "loss.png"):
        assert (cut / name).is_file(), name
    assert not list(cut.rglob("*.tmp*"))
    shutil.copytree(cut, root / "cut1")
    train(_config(root, "cut"), 2, "--set", 'parallel="ddp"', "--resume")
    train(_config(root, "cut1"), 1, "--resume")
    for run in (cut, root / "cut1"):
        _same_losses(train_losses(single), train_losses(run), range(1, 51))
        _same_weights(single, run)
