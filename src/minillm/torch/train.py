"""The PyTorch Trainer: token shards in, a run directory out (minillm.train_loop runs it).

One optimizer step = grad_accum micro-steps whose losses are each divided by grad_accum, so
the gradient equals that of one batch of batch_size sequences. Under torchrun (WORLD_SIZE > 1)
the model is wrapped in DistributedDataParallel or sharded with FSDP (cfg.parallel; see
minillm.torch.parallel), each rank draws its own share of the batch, and only rank 0 writes files
and logs. FSDP runs checkpoint in shards (minillm.torch.sharded_checkpoint): every rank writes its
part when the loop is about to checkpoint, then rank 0 commits it in `save`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm import checkpoint
from minillm.config import TrainConfig
from minillm.files import atomic_write_json
from minillm.schedule import lr_at
from minillm.torch import moe, parallel, sharded_checkpoint
from minillm.torch.model import Transformer, model_params, next_token_loss
from minillm.torch.optim import make_optimizer
from minillm.torch.parallel import setup_distributed
from minillm.torch.run_data import RunData
from minillm.torch.trainer_state import restore_optimizer, save_trainer_state, state_weights
from minillm.train_loop import NonFiniteLoss, checkpoint_due
from minillm.viz.metrics import MetricsLog


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(device: torch.device, name: str) -> torch.dtype:
    """auto: bf16 autocast where the hardware has it, fp16 (+ GradScaler) on older GPUs, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16  # 1.3x per step here, same final loss (BENCHMARKS.md)
    return torch.float32  # elsewhere bf16 is emulated, slower than fp32


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls at ~2x the fp32 rate. Without them, torch emulates bf16."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


class Trainer:
    """Holds the model, optimizer, data and bookkeeping of one run: what minillm.train_loop.Trainer
    asks for; `minillm.train_loop.train(Trainer(cfg))` runs it."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool | None = None):
        self.cfg = cfg
        self.rank, self.world = setup_distributed()
        self.is_main = self.rank == 0
        self.quiet = (not sys.stderr.isatty()) if quiet is None else quiet
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(self.device, cfg.dtype)
        self.run_dir = Path(cfg.out_dir)
        self.data = self.make_data()
        torch.manual_seed(cfg.seed)
        self.model = self.make_model().to(self.device)
        self.sharded, self._staged = self.world > 1 and cfg.parallel == "fsdp", None
        if self.sharded:  # fully_shard swaps the parameters for DTensor shards: before the optimizer
            self._check_fsdp_support()
            self.ddp = parallel.wrap(self.model, cfg, self.world, self.dtype)
        self.opt, self.names = make_optimizer(cfg, self.model, self.lr_scale)
        self.trained = [p for group in self.opt.param_groups for p in group["params"]]  # what clipping sees
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens, self.elapsed, self.best_val = 0, 0, 0.0, math.inf
        self.schedule_step: float | None = None  # where the lr decay stands; the loop sets it per step
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if resume:
            self._resume()
        elif self.is_main:
            checkpoint.check_run_tokenizer(self.run_dir, self.data.dir)
        if not self.sharded:
            self.ddp = parallel.wrap(self.model, cfg, self.world, self.dtype)
        if cfg.compile:
            self.ddp = _try_compile(self.ddp, self.data.micro_batch, cfg.block_size, self.device)

    # --- what a subclass may swap (minillm.torch.sft): data, model, the weights a checkpoint holds --
    def make_data(self) -> RunData:
        return RunData(self.cfg, self.rank, self.world)

    def make_model(self) -> torch.nn.Module:
        return Transformer(self.cfg.model)

    def lr_scale(self, name: str) -> float:
        """A parameter's multiple of the scheduled learning rate (1 for all when pretraining)."""
        return 1.0

    def state_params(self) -> dict[str, np.ndarray]:
        """The weights the resume point holds (all of them when pretraining)."""
        return model_params(self.model)

    def restore_params(self, weights: dict[str, np.ndarray]) -> None:
        checkpoint.check_params(self.cfg.model, weights, f"trainer state ({checkpoint.STATE_FILE})")
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})

    def write_run_files(self, run_dir: Path) -> None:
        checkpoint.save_run_files(run_dir, self.cfg, self.data.dir, self.data.meta)

    def save_weights(self, run_dir: Path, metadata: dict[str, str] | None = None) -> None:
        # FSDP: rank 0 reads the full weights back from the shards just written (no collective)
        params = (sharded_checkpoint.consolidate(self._staged.path, self.cfg.model) if self.sharded
                  else model_params(self.model))
        checkpoint.save_tensors(run_dir / checkpoint.MODEL_FILE, params,
                                metadata={"format": "minillm-1", **(metadata or {})})

    def _check_fsdp_support(self) -> None:
        cfg = self.cfg
        if type(self).state_params is not Trainer.state_params or cfg.compile or cfg.optimizer != "adamw":
            raise ValueError(f"parallel='fsdp' supports pretraining with AdamW, without compile, for now; "
                             f"{type(self).__name__} with optimizer={cfg.optimizer!r}, compile={cfg.compile} "
                             f"needs parallel='ddp'")

    # --- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        sharded = sharded_checkpoint.resume_point(self.run_dir)
        if sharded is not None:
            s = sharded_checkpoint.read_scalars(sharded)
            checkpoint.check_resume(self.run_dir, self.data.dir, self.cfg.model)
            sharded_checkpoint.load(sharded, self.model, self.opt)  # resharded to this run's ranks
            torch.set_rng_state(torch.tensor(s["rng_torch"], dtype=torch.uint8))
        else:
            if self.sharded:
                raise checkpoint.CheckpointError(
                    f"{self.run_dir} was checkpointed unsharded ({checkpoint.STATE_FILE}); FSDP resumes "
                    f"only sharded checkpoints: resume this run with parallel='ddp'")
            tensors, s = checkpoint.read_trainer_state(self.run_dir)
            checkpoint.check_resume(self.run_dir, self.data.dir, self.cfg.model)
            self.restore_params(state_weights(tensors))
            restore_optimizer(self.opt, self.names, tensors, s, self.device)
        self.step, self.tokens, self.elapsed = s["step"], s["tokens"], s["elapsed"]
        self.best_val = s["best_val"]
        loader = s["loader"]  # {rank: state} under DDP, one state otherwise
        self.data.train.load_state_dict(loader[str(self.rank)] if str(self.rank) in loader else loader)
        if self.is_main:
            self.metrics.truncate_after(self.step)
            print(f"resumed {self.run_dir} at step {self.step} ({self.tokens:,} tokens seen)")

    def finish(self) -> None:
        """The run ended within its budget (minillm.train_loop.train): close torch.distributed."""
        parallel.finish_distributed()

    def weights_finite(self) -> bool:
        if self.sharded and self._staged and self._staged.step == self.step:
            return self._staged.finite  # all ranks' shards, checked together while staging
        return all(bool(torch.isfinite(parallel.local(p)).all()) for p in self.model.parameters())

    def save(self) -> None:
        scalars = dict(step=self.step, tokens=self.tokens, elapsed=self.elapsed, best_val=self.best_val,
                       loader=self.data.train.state_dict())
        self.write_run_files(self.run_dir)
        if self.sharded:
            return self._commit_shards(scalars)
        save_trainer_state(self.run_dir, self.state_params(), self.opt, self.names, scalars)
        self.save_weights(self.run_dir)
        sharded_checkpoint.remove(self.run_dir)  # an older FSDP resume point, if any

    # --- FSDP: every rank stages its shards where the loop will checkpoint, rank 0 commits -----
    def _stage_shards(self, step: int) -> None:
        """Collective (every rank): write this rank's shards for the checkpoint of `step`."""
        finite = torch.tensor(float(all(bool(torch.isfinite(parallel.local(p)).all())
                                        for p in self.model.parameters())))
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        path = sharded_checkpoint.stage(self.run_dir, step, self.model, self.opt)
        self._staged = sharded_checkpoint.Staged(step, path, bool(finite.item()))

    def _commit_shards(self, scalars: dict[str, Any]) -> None:
        if not self._staged or self._staged.step != self.step:  # e.g. Ctrl-C: the ranks cannot meet now
            print(f"FSDP: no checkpoint at step {self.step} (shards are written with every rank at "
                  f"checkpoint steps); the last committed one stands", file=sys.stderr)
            return
        scalars = {**scalars, "optimizer": "adamw", "world_size": self.world,
                   "rng_torch": torch.get_rng_state().tolist()}
        self._staged = self._staged._replace(path=sharded_checkpoint.commit(self._staged.path, scalars))
        self.save_weights(self.run_dir)  # model.safetensors, consolidated from the shards
        (self.run_dir / checkpoint.STATE_FILE).unlink(missing_ok=True)  # an older single-file point
        atomic_write_json(self.run_dir / "trainer_state.json", {k: v for k, v in scalars.items()
                                                                if k != "rng_torch"})

    def save_best(self, val: float) -> None:
        self.best_val = val
        best = self.run_dir / "best"
        self.write_run_files(best)
        self.save_weights(best, {"step": str(self.step), "val_loss": repr(val)})

    # --- one optimizer step ------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a micro-batch, x and y (b, T); through DDP / compile when on; plus
        a mixture of experts' load-balancing loss (minillm.torch.moe), which is 0 without one."""
        return next_token_loss(self.ddp(x), y) + moe.aux_loss(self.model)

    def row_extras(self) -> dict:  # what the loop adds to a train row: MoE expert usage, if any
        return moe.expert_usage(self.model)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self) -> tuple[float, float]:
        """grad_accum micro-steps then one optimizer step; returns (mean loss, grad norm before clipping)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.schedule_step)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.data.train_batch(self.device)  # (b, T) each, b = batch_size / (grad_accum * world)
            with parallel.no_grad_sync(self.ddp, last_micro_step=micro == cfg.grad_accum - 1):
                with self.autocast():
                    loss = self.loss(x, y) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.item()
        total = self._mean_over_ranks(total)  # log the global batch's loss, not this rank's share
        self.scaler.unscale_(self.opt)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = parallel.full_value(torch.nn.utils.clip_grad_norm_(self.trained, max_norm)).item()
        # fp16's GradScaler skips steps with inf gradients by design; otherwise inf/NaN stops the run
        if not math.isfinite(total) or (not math.isfinite(grad_norm) and not self.scaler.is_enabled()):
            raise NonFiniteLoss(total if not math.isfinite(total)
                                else f"finite, but gradient norm {grad_norm}")
        self.scaler.step(self.opt)
        # The fused AdamW kernel writes the weights without bumping their version counters, which
        # is how generation's packed copy (torch/packed.py) sees that weights changed: bump them.
        torch.autograd.graph.increment_version(self.trained)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.sharded and checkpoint_due(cfg, self.step + 1):
            self._stage_shards(self.step + 1)  # the loop will checkpoint right after this step
        return total, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed set of eval_batches validation batches (the same every time)."""
        self.model.eval()
        losses = []
        for x, y in self.data.val_batches(self.device):
            with self.autocast():
                losses.append(next_token_loss(self.model(x), y).item())
        self.model.train()
        if self.sharded:
            self._stage_shards(self.step)  # the loop checkpoints after every evaluation
        return self._mean_over_ranks(float(np.mean(losses)))

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor(value, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def describe(self) -> str:
        """The precision line: dtype "auto" may mean bf16 autocast, even on a CPU, so say which."""
        name = str(self.dtype).removeprefix("torch.")
        precision = name if self.dtype == torch.float32 else f"{name} autocast"
        return f"training on {self.device} in {precision} (dtype = {self.cfg.dtype!r})"


def _try_compile(model, batch: int, block: int, device: torch.device):
    """torch.compile, checked on one dummy forward/backward (compilation is lazy, so errors would
    otherwise surface mid-run). On any failure: a clear message and the eager model."""
    try:
        compiled = torch.compile(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x = torch.zeros(batch, block, dtype=torch.long, device=device)
            compiled(x).float().mean().backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
        model.zero_grad(set_to_none=True)
        print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training without it",
              file=sys.stderr)
        return model
