"""The JAX Trainer: token shards in, a run directory out (minillm.train_loop runs it).

The twin of minillm/torch/train.py: the same batches (minillm.data.loader, the same seeded
windows, grad_accum micro-batches per step), the same AdamW (minillm.jax.optim), the same run
directory, so either framework resumes and samples the other's runs. The step itself is the
pure, jitted function of minillm.jax.step. With several devices (local GPUs, forced host devices,
or several processes started with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)
the batch is split across them and the state replicated or sharded (cfg.parallel; see
minillm.jax.parallel); each process loads its own rows, and process 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minillm import checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.data.loader import BatchLoader
from minillm.jax import parallel
from minillm.jax.model import forward, init_params, params_to_canonical
from minillm.jax.moe import expert_usage
from minillm.jax.optim import make_optimizer
from minillm.jax.step import TrainState, init_train_state, make_eval_loss, make_train_step
from minillm.jax.trainer_state import restore_trainer_state, save_trainer_state
from minillm.train_loop import NonFiniteLoss, checkpoint_due, row_due
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
        parallel.initialize_distributed()  # several processes: before anything touches a device
        self.cfg, self.rank, self.world = cfg, jax.process_index(), jax.process_count()
        self.is_main = self.rank == 0
        self.quiet = (not sys.stderr.isatty()) if quiet is None else quiet
        self.dtype = resolve_dtype(cfg.dtype)
        self.run_dir, self.data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
        self.meta = checkpoint.check_data_dir(self.data_dir, cfg.model.vocab_size)
        micro = cfg.batch_size // cfg.grad_accum  # global; each process reads micro / world rows
        shard = dict(rank=self.rank, world_size=self.world)
        self.train = BatchLoader(self.data_dir, cfg.block_size, micro, seed=cfg.seed, **shard)
        self.val = BatchLoader(self.data_dir, cfg.block_size, micro, split="val", seed=cfg.seed + 1, **shard)
        self.rng, init_key = jax.random.split(jax.random.key(cfg.seed))  # the same in every process
        init = functools.partial(init_params, cfg.model)
        self.optimizer = make_optimizer(cfg, jax.eval_shape(init, init_key))  # decay mask: names, ndim
        self._setup_devices(micro, lambda key: init_train_state(init(key), self.optimizer), init_key)
        self.step, self.tokens, self.elapsed, self.best_val = 0, 0, 0.0, math.inf
        self.schedule_step = None  # the loop sets it; the compiled schedule follows steps and tokens
        if cfg.max_time and cfg.schedule != "constant" and self.is_main:
            print("note: the JAX schedule decays by steps and tokens, not by max_time (the PyTorch "
                  "backend follows max_time too); set max_steps or max_tokens to end the decay",
                  file=sys.stderr)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self._usage: jax.Array | None = None  # a mixture of experts' usage for the next train row
        self._snapshot: tuple[int, TrainState] | None = None  # (step, host copy) for save(); see _sync
        if resume:
            self._resume()
        elif self.is_main:
            checkpoint.check_run_tokenizer(self.run_dir, self.data_dir)

    def _setup_devices(self, micro: int, init, key: jax.Array) -> None:
        """The state, from init(key), and the jitted step and eval loss. One device: plain jit.
        Several (and micro divisible by their number, which several processes require): the mesh,
        the state replicated or sharded by cfg.parallel; jitted with the shardings as its output,
        init builds each device's part only, so no device ever holds a whole sharded state."""
        n, cfg = jax.device_count(), self.cfg
        if self.world > 1 and micro % n:
            raise ValueError(f"micro-batch {micro} (batch_size / grad_accum) must be divisible by the "
                             f"number of devices of all processes ({n})")
        self.mesh = parallel.make_mesh() if n > 1 and micro % n == 0 else None
        if self.mesh is None:
            self.shardings = None
            self.state = jax.jit(init)(key)  # one program: faster than initialising op by op
            self._step = make_train_step(cfg.model, cfg, self.optimizer, self.dtype)
            self._eval_loss = make_eval_loss(cfg.model, self.dtype)
            self._expert_usage = make_expert_usage(cfg.model, self.dtype)
            return
        self.shardings = parallel.state_shardings(jax.eval_shape(init, key), self.mesh, cfg.parallel)
        self.state = jax.jit(init, out_shardings=self.shardings)(key)
        self._step = parallel.make_parallel_train_step(cfg.model, cfg, self.optimizer, self.mesh, self.dtype,
                                                       self.shardings)
        self._eval_loss = parallel.make_parallel_eval_loss(cfg.model, self.mesh, self.shardings.params,
                                                           self.dtype)
        self._expert_usage = make_expert_usage(cfg.model, self.dtype, parallel.replicated(self.mesh))

    def describe(self) -> str:
        name = jnp.dtype(self.dtype).name
        precision = name if name == "float32" else f"{name} (float32 master weights)"
        line = f"training on {jax.default_backend()} in {precision} (dtype = {self.cfg.dtype!r})"
        if self.mesh is None:
            return line
        placed = "sharded" if self.cfg.parallel == "fsdp" else "replicated"
        return (f"{line}, {self.mesh.size} devices of {self.world} process(es), parameters {placed} "
                f"(parallel = {self.cfg.parallel!r})")

    # --- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        tensors, s = checkpoint.read_trainer_state(self.run_dir)
        checkpoint.check_resume(self.run_dir, self.data_dir, self.cfg.model)
        self.state, rng = restore_trainer_state(self.state, tensors, s, self.cfg.model)
        if self.shardings is not None:
            self.state = parallel.place(self.state, self.shardings)
        self.rng = rng if rng is not None else self.rng  # a torch-written state has no JAX key
        self.step, self.tokens, self.elapsed = s["step"], s["tokens"], s["elapsed"]
        self.best_val = s["best_val"]
        self.train.load_state_dict(s["loader"]["0"] if "0" in s["loader"] else s["loader"])
        if self.is_main:
            self.metrics.truncate_after(self.step)
            print(f"resumed {self.run_dir} at step {self.step} ({self.tokens:,} tokens seen)")

    def _sync(self, step: int) -> None:
        """Several processes: gather the state to host memory (a collective, so at a point every
        process reaches) for process 0 to check and save at `step`. The loop checkpoints from
        process 0 alone, which cannot gather sharded arrays by itself: every process calls this in
        evaluate() and before a checkpoint_interval checkpoint, which covers every checkpoint but a
        Ctrl-C's."""
        if self.world > 1:
            state = parallel.gather(self.state)
            self._snapshot = (step, state) if self.is_main else None

    def _state_to_save(self) -> TrainState | None:
        """One process: the state itself. Several: process 0's host copy gathered at this step, or
        None (on other processes, or after a Ctrl-C between sync points)."""
        if self.world == 1:
            return self.state
        if self._snapshot is None or self._snapshot[0] != self.step:
            return None
        return self._snapshot[1]

    def weights_finite(self) -> bool:
        state = self._state_to_save()
        xp = jnp if self.world == 1 else np  # a host copy is checked on the host: it may not fit a device
        return state is None or all(bool(xp.isfinite(p).all()) for p in state.params.values())

    def save(self) -> None:
        """The full resume point in out_dir (weights, AdamW moments, PRNG key, counters, loader)."""
        state = self._state_to_save()
        if not self.is_main:
            return
        if state is None:  # several processes interrupted between sync points
            print(f"{self.world} processes: no copy of step {self.step} gathered; the last checkpoint in "
                  f"{self.run_dir} stays the resume point", file=sys.stderr)
            return
        checkpoint.save_run_files(self.run_dir, self.cfg, self.data_dir, self.meta)
        scalars = dict(step=self.step, tokens=self.tokens, elapsed=self.elapsed, best_val=self.best_val,
                       loader=self.train.state_dict())
        save_trainer_state(self.run_dir, state, self.rng, scalars)

    def save_best(self, val: float) -> None:
        self.best_val = val
        state = self._state_to_save()
        if not self.is_main or state is None:
            return
        best = self.run_dir / "best"
        checkpoint.save_run_files(best, self.cfg, self.data_dir, self.meta)
        checkpoint.save_tensors(best / checkpoint.MODEL_FILE, params_to_canonical(state.params),
                                metadata={"format": "minillm-1", "step": str(self.step),
                                          "val_loss": repr(val)})

    # --- one optimizer step ------------------------------------------------------------------
    def _batch(self) -> tuple[jax.Array, jax.Array]:
        """grad_accum micro-batches from the loader, stacked: xs, ys (grad_accum, b, T) int32 (this
        process's b / world rows, joined into the global batch on the mesh)."""
        pairs = [self.train.next_batch() for _ in range(self.cfg.grad_accum)]
        xs = np.stack([x for x, _ in pairs]).astype(np.int32)
        ys = np.stack([y for _, y in pairs]).astype(np.int32)
        return self._place_batch(xs), self._place_batch(ys)

    def _place_batch(self, a: np.ndarray) -> jax.Array:
        return jnp.asarray(a) if self.mesh is None else parallel.shard_batch(a, self.mesh)

    def train_step(self) -> tuple[float, float]:
        """One AdamW update over grad_accum micro-batches; returns (mean loss, grad norm before clipping)."""
        self.rng, key = jax.random.split(self.rng)
        xs, ys = self._batch()
        if self._expert_usage is not None and row_due(self.cfg, self.step + 1):  # before the step donates
            self._usage = self._expert_usage(self.state.params, xs[-1])  # the last micro-batch, as torch's
        with _signals_deferred():  # the step donates the old state: a Ctrl-C must not lose the new one
            self.state, metrics = self._step(self.state, xs, ys, key)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss)  # the step kept the previous state
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"finite, but gradient norm {grad_norm}")
        if checkpoint_due(self.cfg, self.step + 1):
            self._sync(self.step + 1)  # the loop checkpoints after this step, without an evaluation
        return loss, grad_norm

    def row_extras(self) -> dict:
        """What the loop adds to a train row: {"expert_usage": per MoE layer, the fraction of the last
        micro-batch's tokens routed to each expert} (rows sum to experts_per_token), as the PyTorch
        trainer logs it; {} without MoE. Measured with the weights before the step, on the whole
        global micro-batch (torch's: rank 0's rows of it)."""
        if self._usage is None:
            return {}
        return {"expert_usage": [[round(float(v), 4) for v in layer] for layer in np.asarray(self._usage)]}

    def evaluate(self) -> float:
        """Mean loss over the same eval_batches validation windows every time (as the PyTorch trainer)."""
        self.val.load_state_dict({"seed": self.val.seed, "step": 0})
        losses = []
        for _ in range(self.cfg.eval_batches):
            x, y = self.val.next_batch()
            x, y = self._place_batch(x.astype(np.int32)), self._place_batch(y.astype(np.int32))
            losses.append(float(self._eval_loss(self.state.params, x, y)))
        self._sync(self.step)  # a checkpoint follows every evaluation
        return float(np.mean(losses))


def make_expert_usage(config: ModelConfig, dtype, out_sharding=None):
    """A jitted usage(params, x) -> (layers, n_experts) expert usage of the forward of x (b, T), in the
    step's compute dtype (minillm.jax.moe.expert_usage); None for a dense model. out_sharding: the
    result replicated on a mesh, so process 0 can read it."""
    if config.n_experts <= 1:
        return None

    def usage(params, x):
        if dtype != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(dtype), params)
        router_logits = []
        forward(params, config, x, router_logits=router_logits)
        return expert_usage(router_logits, config)

    return jax.jit(usage, out_shardings=out_sharding)


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
