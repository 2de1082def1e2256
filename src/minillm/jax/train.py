"""The JAX Trainer: token shards in, a run directory out (minillm.train_loop runs it).

The twin of minillm/torch/train.py: the same batches (minillm.data.loader, the same seeded
windows, grad_accum micro-batches per step), the same AdamW (minillm.jax.optim), the same run
directory, so either framework resumes and samples the other's runs. The step itself is the
pure, jitted function of minillm.jax.step. With several local devices (GPUs, or forced host
devices) the batch is split across them (minillm.jax.parallel) when the micro-batch divides evenly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minillm import checkpoint
from minillm.config import TrainConfig
from minillm.data.loader import BatchLoader
from minillm.jax import parallel
from minillm.jax.model import init_params, params_to_canonical
from minillm.jax.optim import make_optimizer
from minillm.jax.step import init_train_state, make_eval_loss, make_train_step
from minillm.jax.trainer_state import restore_trainer_state, save_trainer_state
from minillm.train_loop import NonFiniteLoss
from minillm.viz.metrics import MetricsLog


def resolve_dtype(name: str) -> jnp.dtype:
    """What the forward/backward computes in (params and AdamW stay float32). auto: bfloat16 on
    accelerators; float32 on CPU, where XLA's bf16 step is no faster (a paired gpt-char step,
    batch 16 x 64, on this 2-core CPU: 0.15-0.19 s in either dtype), so it buys nothing there."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={name!r}: the JAX trainer trains in float32 or bfloat16 (float16 needs the "
                         "loss scaling of the torch backend)")
    return jnp.dtype(name)


class Trainer:
    """Holds the state, data and bookkeeping of one JAX run: what minillm.train_loop.Trainer asks
    for; `minillm.train_loop.train(Trainer(cfg))` runs it."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool | None = None):
        self.cfg, self.is_main = cfg, jax.process_index() == 0
        self.quiet = (not sys.stderr.isatty()) if quiet is None else quiet
        self.dtype = resolve_dtype(cfg.dtype)
        self.run_dir, self.data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
        self.meta = checkpoint.check_data_dir(self.data_dir, cfg.model.vocab_size)
        micro = cfg.batch_size // cfg.grad_accum
        self.train = BatchLoader(self.data_dir, cfg.block_size, micro, seed=cfg.seed)
        self.val = BatchLoader(self.data_dir, cfg.block_size, micro, split="val", seed=cfg.seed + 1)
        self.rng, init_key = jax.random.split(jax.random.key(cfg.seed))
        params = init_params(cfg.model, init_key)
        self.optimizer = make_optimizer(cfg, params)
        self.state = init_train_state(params, self.optimizer)
        self.step, self.tokens, self.elapsed, self.best_val = 0, 0, 0.0, math.inf
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if resume:
            self._resume()
        elif self.is_main:
            checkpoint.check_run_tokenizer(self.run_dir, self.data_dir)
        n = len(jax.devices())
        self.mesh = parallel.make_mesh() if n > 1 and micro % n == 0 else None
        if self.mesh is None:
            self._step = make_train_step(cfg.model, cfg, self.optimizer, self.dtype)
        else:
            self._step = parallel.make_parallel_train_step(cfg.model, cfg, self.optimizer, self.mesh,
                                                           self.dtype)
            self.state = parallel.replicate(self.state, self.mesh)
        self._eval_loss = make_eval_loss(cfg.model, self.dtype)

    def describe(self) -> str:
        name = jnp.dtype(self.dtype).name
        precision = name if name == "float32" else f"{name} (float32 master weights)"
        return f"training on {jax.default_backend()} in {precision} (dtype = {self.cfg.dtype!r})"

    # --- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        tensors, s = checkpoint.read_trainer_state(self.run_dir)
        checkpoint.check_resume(self.run_dir, self.data_dir, self.cfg.model)
        self.state, rng = restore_trainer_state(self.state, tensors, s, self.cfg.model)
        self.rng = rng if rng is not None else self.rng  # a torch-written state has no JAX key
        self.step, self.tokens, self.elapsed = s["step"], s["tokens"], s["elapsed"]
        self.best_val = s["best_val"]
        self.train.load_state_dict(s["loader"]["0"] if "0" in s["loader"] else s["loader"])
        if self.is_main:
            self.metrics.truncate_after(self.step)
            print(f"resumed {self.run_dir} at step {self.step} ({self.tokens:,} tokens seen)")

    def weights_finite(self) -> bool:
        return all(bool(jnp.isfinite(p).all()) for p in self.state.params.values())

    def save(self) -> None:
        """The full resume point in out_dir (weights, AdamW moments, PRNG key, counters, loader)."""
        checkpoint.save_run_files(self.run_dir, self.cfg, self.data_dir, self.meta)
        scalars = dict(step=self.step, tokens=self.tokens, elapsed=self.elapsed, best_val=self.best_val,
                       loader=self.train.state_dict())
        save_trainer_state(self.run_dir, self.state, self.rng, scalars)

    def save_best(self, val: float) -> None:
        self.best_val = val
        best = self.run_dir / "best"
        checkpoint.save_run_files(best, self.cfg, self.data_dir, self.meta)
        checkpoint.save_tensors(best / checkpoint.MODEL_FILE, params_to_canonical(self.state.params),
                                metadata={"format": "minillm-1", "step": str(self.step),
                                          "val_loss": repr(val)})

    # --- one optimizer step ------------------------------------------------------------------
    def _batch(self) -> tuple[jax.Array, jax.Array]:
        """grad_accum micro-batches from the loader, stacked: xs, ys (grad_accum, b, T) int32."""
        pairs = [self.train.next_batch() for _ in range(self.cfg.grad_accum)]
        xs = np.stack([x for x, _ in pairs]).astype(np.int32)
        ys = np.stack([y for _, y in pairs]).astype(np.int32)
        if self.mesh is not None:
            return parallel.shard_batch(xs, self.mesh), parallel.shard_batch(ys, self.mesh)
        return jnp.asarray(xs), jnp.asarray(ys)

    def train_step(self) -> tuple[float, float]:
        """One AdamW update over grad_accum micro-batches; returns (mean loss, grad norm before clipping)."""
        self.rng, key = jax.random.split(self.rng)
        xs, ys = self._batch()
        with _signals_deferred():  # the step donates the old state: a Ctrl-C must not lose the new one
            self.state, metrics = self._step(self.state, xs, ys, key)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss)  # the step kept the previous state
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"finite, but gradient norm {grad_norm}")
        return loss, grad_norm

    def evaluate(self) -> float:
        """Mean loss over the same eval_batches validation windows every time (as the PyTorch trainer)."""
        self.val.load_state_dict({"seed": self.val.seed, "step": 0})
        losses = []
        for _ in range(self.cfg.eval_batches):
            x, y = self.val.next_batch()
            x, y = jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)
            losses.append(float(self._eval_loss(self.state.params, x, y)))
        return float(np.mean(losses))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends, then raise them for the usual handlers."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    held: list[int] = []
    handlers = {sig: signal.signal(sig, lambda number, frame: held.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sig in held:
            signal.raise_signal(sig)
