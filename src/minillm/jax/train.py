"""Training in JAX. One optimizer step: loss, gradients over grad_accum micro-batches, global-norm
clipping and AdamW with the PyTorch side's decay mask and learning-rate schedule, all in one
jitted function.

The same update as minillm/torch/train.py (Trainer.train_step) with torch.optim.AdamW:
    g      = mean over micro-batches of ∇ loss                   (gradient accumulation)
    g      = g * min(1, max_norm / (‖g‖ + 1e-6))                 (clip_grad_norm_'s formula)
    m, v   = β1 m + (1-β1) g,  β2 v + (1-β2) g²
    θ      = θ - lr_t (m̂ / (√v̂ + ε) + λ θ)      λ only for matrices (Loshchilov & Hutter 2019)
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

import jax
from minillm import checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.jax.model import Params, forward, next_token_loss


class TrainState(NamedTuple):
    """Everything a step changes: the canonical params and the optimizer state (step count inside)."""

    params: Params
    opt_state: optax.OptState


def decay_mask(params: Params) -> dict[str, bool]:
    """True for parameters with weight decay: matrices (Q, K, V, O, MLP, an untied head); not
    embeddings, norm gains or biases. A tied embedding is one entry (tok_emb.weight)."""
    return {name: p.ndim >= 2 and name not in ("tok_emb.weight", "pos_emb.weight") for name, p in params.items()}


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """minillm.schedule.lr_at as a traceable function of the step (warmup, then cosine |
    constant | warmup-stable-decay); tests check the two agree at every step."""
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            after = jnp.asarray(cfg.lr, jnp.float32)
        elif cfg.schedule == "wsd":
            decay_start = total - cfg.decay_frac * total
            frac = jnp.clip((step - decay_start) / max(1e-9, total - decay_start), 0.0, 1.0)
            after = cfg.lr + frac * (cfg.min_lr - cfg.lr)
        else:  # cosine
            progress = jnp.minimum(1.0, (step - warmup) / max(1, total - warmup))
            after = cfg.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
        return jnp.where(step < warmup, warm, after)

    return schedule


def make_optimizer(cfg: TrainConfig, params: Params) -> optax.GradientTransformation:
    """AdamW, spelled out as optax.adamw is (Adam moments, decoupled decay on the masked
    parameters, times -lr), so its state has named moments the checkpoint can save."""
    return optax.chain(
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)),
        optax.scale_by_learning_rate(lr_schedule(cfg)),
    )


def clip_by_global_norm(grads: Params, max_norm: float) -> tuple[Params, jax.Array]:
    """Scale all gradients together so their global L2 norm is at most max_norm (0 = no clipping),
    with torch.nn.utils.clip_grad_norm_'s formula. Returns (grads, norm before clipping)."""
    norm = optax.tree.norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads), norm


def loss_fn(params: Params, config: ModelConfig, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of one batch: x, y (B, T) int; key turns dropout on."""
    return next_token_loss(forward(params, config, x, key=key), y)


def accumulate_grads(params: Params, config: ModelConfig, xs: jax.Array, ys: jax.Array,
                     key: jax.Array | None = None) -> tuple[jax.Array, Params]:
    """Loss and gradient averaged over micro-batches xs, ys (A, b, T): equal to one batch of A*b
    sequences. lax.scan keeps one micro-batch's activations alive at a time."""
    A = xs.shape[0]
    keys = jax.random.split(key, A) if key is not None else None
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(carry, inputs):
        loss_sum, grad_sum = carry
        x, y, k = inputs
        loss, grads = grad_fn(params, config, x, y, k)
        return (loss_sum + loss / A, jax.tree.map(lambda s, g: s + g / A, grad_sum, grads)), None

    if A == 1:  # no scan for the common case: one micro-batch
        return grad_fn(params, config, xs[0], ys[0], keys[0] if keys is not None else None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), (xs, ys, keys))
    return loss, grads


def train_step_fn(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """The step as a pure function step(state, xs, ys, key) -> (state, metrics), not yet jitted
    (make_train_step jits it for one device, minillm.jax.parallel for several).
    xs, ys (grad_accum, b, T) int32; key: a PRNG key, used for dropout when config.dropout > 0;
    metrics = {"loss", "grad_norm"} (the norm before clipping). A step whose loss or gradient is
    not finite returns the state unchanged (the trainer then stops, as the PyTorch one does)."""
    use_dropout = config.dropout > 0

    def step(state: TrainState, xs: jax.Array, ys: jax.Array, key: jax.Array):
        loss, grads = accumulate_grads(state.params, config, xs, ys, key if use_dropout else None)
        grads, grad_norm = clip_by_global_norm(grads, cfg.grad_clip)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf step leaves the state as it was
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {"loss": loss, "grad_norm": grad_norm}

    return step


def make_train_step(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """train_step_fn jitted for one device. The state is donated: its buffers are updated in place."""
    return jax.jit(train_step_fn(config, cfg, optimizer), donate_argnums=0)


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params))


def make_eval_loss(config: ModelConfig):
    """A jitted loss(params, x, y) -> mean loss of one batch, dropout off."""
    return jax.jit(lambda params, x, y: loss_fn(params, config, x, y))


# --- the trainer: token shards in, a run directory out (the format of minillm/torch/train.py) -----
class Trainer:
    """Holds the state, data and bookkeeping of one JAX run; `fit()` runs it (train_loop.py).

    Batches come from minillm.data.loader exactly as in the PyTorch trainer (the same seeded
    windows, grad_accum micro-batches per step), so both trainers read the same tokens. With
    several local devices (GPUs, or forced host devices) the batch is split across them
    (minillm.jax.parallel) when the micro-batch divides evenly."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool | None = None):
        from minillm.data.loader import BatchLoader
        from minillm.jax import parallel
        from minillm.jax.model import init_params
        from minillm.viz.metrics import MetricsLog

        if cfg.dtype not in ("auto", "float32"):
            raise ValueError(f"the JAX trainer trains in float32; got dtype={cfg.dtype!r} (use the torch backend "
                             "for mixed precision)")
        self.cfg, self.is_main = cfg, jax.process_index() == 0
        self.quiet = (not sys.stderr.isatty()) if quiet is None else quiet
        self.run_dir, self.data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
        self.meta = checkpoint.check_data_dir(self.data_dir, cfg.model.vocab_size)
        micro = cfg.batch_size // cfg.grad_accum
        self.train = BatchLoader(self.data_dir, cfg.block_size, micro, seed=cfg.seed)
        self.val = BatchLoader(self.data_dir, cfg.block_size, micro, split="val", seed=cfg.seed + 1)
        self.rng = jax.random.key(cfg.seed)
        self.rng, init_key = jax.random.split(self.rng)
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
            self._step = make_train_step(cfg.model, cfg, self.optimizer)
        else:
            self._step = parallel.make_parallel_train_step(cfg.model, cfg, self.optimizer, self.mesh)
            self.state = parallel.replicate(self.state, self.mesh)
        self._eval_loss = make_eval_loss(cfg.model)

    # --- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        from minillm.jax.trainer_state import read_trainer_state, restore_trainer_state

        tensors, s = read_trainer_state(self.run_dir)
        saved = checkpoint.load_config(self.run_dir)
        if saved != self.cfg.model:
            raise checkpoint.CheckpointError(
                f"{self.run_dir} was trained with a different model config (another architecture?): "
                f"saved {saved}, asked for {self.cfg.model}")
        checkpoint.check_run_tokenizer(self.run_dir, self.data_dir)
        self.state, rng = restore_trainer_state(self.state, tensors, s, self.cfg.model)
        self.rng = rng if rng is not None else self.rng
        self.step, self.tokens, self.elapsed, self.best_val = s["step"], s["tokens"], s["elapsed"], s["best_val"]
        self.train.load_state_dict(s["loader"]["0"] if "0" in s["loader"] else s["loader"])
        if self.is_main:
            self.metrics.truncate_after(self.step)
            print(f"resumed {self.run_dir} at step {self.step} ({self.tokens:,} tokens seen)")

    def save(self, run_dir: Path | None = None, best_val: float | None = None) -> None:
        """The full resume point in out_dir; with run_dir=best/, only config, tokenizer and weights."""
        from minillm.jax.model import params_to_canonical
        from minillm.jax.trainer_state import save_trainer_state

        if not self.is_main:
            return
        run_dir = run_dir or self.run_dir
        checkpoint.atomic_write_text(run_dir / checkpoint.TOKENIZER_FILE,
                                     (self.data_dir / "tokenizer.json").read_text(encoding="utf-8"))
        train = {k: v for k, v in self.cfg.to_dict().items() if k != "model"}
        checkpoint.atomic_write_json(run_dir / checkpoint.CONFIG_FILE,
                                     {"model": self.cfg.model.to_dict(), "train": train, "data": self.meta})
        if best_val is not None:
            checkpoint.save_tensors(run_dir / checkpoint.MODEL_FILE, params_to_canonical(self.state.params),
                                    metadata={"format": "minillm-1", "step": str(self.step), "val_loss": repr(best_val)})
            return
        scalars = dict(step=self.step, tokens=self.tokens, elapsed=self.elapsed, best_val=self.best_val,
                       loader=self.train.state_dict())
        save_trainer_state(run_dir, self.state, self.rng, scalars)

    def _save_best(self, val: float) -> None:
        self.best_val = val
        self.save(self.run_dir / "best", best_val=val)

    # --- one optimizer step ------------------------------------------------------------------
    def _batch(self) -> tuple[jax.Array, jax.Array]:
        """grad_accum micro-batches from the loader, stacked: xs, ys (grad_accum, b, T) int32."""
        pairs = [self.train.next_batch() for _ in range(self.cfg.grad_accum)]
        xs = np.stack([x for x, _ in pairs]).astype(np.int32)
        ys = np.stack([y for _, y in pairs]).astype(np.int32)
        if self.mesh is not None:
            from minillm.jax.parallel import shard_batch

            return shard_batch(xs, self.mesh), shard_batch(ys, self.mesh)
        return jnp.asarray(xs), jnp.asarray(ys)

    def train_step(self) -> tuple[float, float]:
        """One AdamW update over grad_accum micro-batches; returns (mean loss, grad norm before clipping)."""
        from minillm.jax.train_loop import NonFiniteLoss

        self.rng, key = jax.random.split(self.rng)
        xs, ys = self._batch()
        self.state, metrics = self._step(self.state, xs, ys, key)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLoss(loss)  # the step kept the previous state
        return loss, grad_norm

    def evaluate(self) -> float:
        """Mean loss over the same eval_batches validation windows every time (as the PyTorch trainer)."""
        self.val.load_state_dict({"seed": self.val.seed, "step": 0})
        losses = []
        for _ in range(self.cfg.eval_batches):
            x, y = self.val.next_batch()
            losses.append(float(self._eval_loss(self.state.params, jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32))))
        return float(np.mean(losses))

    def fit(self) -> dict:
        from minillm.jax.train_loop import run_loop

        return run_loop(self)


def train(cfg: TrainConfig, resume: bool = False, quiet: bool | None = None) -> dict:
    """Train per cfg with JAX (resuming from cfg.out_dir if asked); returns a summary dict.
    The run directory is the PyTorch trainer's format: either framework samples from it."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves like Ctrl-C does
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, old)
