"""THE training loop, framework-free: both trainers (minillm.torch.train, minillm.jax.train) run it.

A trainer owns the model, the optimizer and the data; this loop owns everything around the
optimizer step: the budget (steps, tokens, training seconds, evaluation excluded), throughput,
evaluation and best/, periodic checkpoints, the metrics.jsonl rows, Ctrl-C / SIGTERM, and the
guards against a run gone wrong (an unexpected step-0 loss, a non-finite loss, non-finite
weights that must never be saved).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from minillm.config import TrainConfig
from minillm.schedule import lr_at, schedule_step
from minillm.viz.metrics import MetricsLog


class Trainer(Protocol):
    """What a trainer provides. The loop advances its counters; its checkpoints save and restore them."""

    cfg: TrainConfig
    run_dir: Path
    is_main: bool  # rank 0: the one process that writes files and logs
    quiet: bool  # no progress bar
    metrics: MetricsLog
    step: int  # optimizer steps done
    tokens: int  # tokens trained on
    elapsed: float  # training seconds, evaluations excluded, across resumes
    best_val: float  # best validation loss so far (inf before the first)
    schedule_step: float | None  # set by the loop before each step: where the lr decay stands

    def describe(self) -> str:
        """One line said before a fresh run: device and precision ("auto" may mean bf16)."""

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; (mean loss, grad norm before clipping). Raises NonFiniteLoss,
        without applying the update, when the loss or the gradient is not finite."""

    def evaluate(self) -> float:
        """Mean validation loss over a fixed set of batches (the same every time); every rank calls it."""

    def weights_finite(self) -> bool:
        """Whether every parameter is finite (non-finite weights are never checkpointed)."""

    def save(self) -> None:
        """The full resume point (weights, optimizer, RNG, data position, counters) in run_dir."""

    def save_best(self, val: float) -> None:
        """Set best_val and write config, tokenizer and weights to run_dir/best."""


class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient, or the weights) became inf or NaN; nothing non-finite is saved."""


class _Clock:
    """Training seconds: `elapsed` from earlier sessions plus the running stretch, paused for evals;
    and the throughput since the last train row."""

    def __init__(self, elapsed: float, tokens: int):
        self.before, self.start = elapsed, time.perf_counter()
        self.mark = (tokens, elapsed)  # tokens and training seconds at the last train row

    def now(self) -> float:
        return self.before + time.perf_counter() - self.start

    def pause(self) -> float:
        self.before, self.start = self.now(), time.perf_counter()
        return self.before

    def resume(self) -> None:
        self.start = time.perf_counter()

    def tokens_per_s(self, tokens: int) -> float:
        """Tokens per training second since the previous call (or the start)."""
        (tokens_before, before), now = self.mark, self.now()
        self.mark = (tokens, now)
        return (tokens - tokens_before) / max(now - before, 1e-9)


def train(trainer: Trainer) -> dict:
    """Run a trainer (either framework's) to the end of its budget; SIGTERM saves like Ctrl-C."""
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM -> KeyboardInterrupt
    try:
        summary = run_loop(trainer)
        if not summary["interrupted"] and hasattr(trainer, "finish"):
            trainer.finish()  # e.g. every rank meets, then the process group closes
        return summary
    finally:
        signal.signal(signal.SIGTERM, old)


def row_due(cfg, step: int) -> bool:
    """Whether the loop logs a train row after `step`: every log_interval steps, and the first."""
    return step % cfg.log_interval == 0 or step == 1


def checkpoint_due(cfg, step: int) -> bool:
    """Whether the loop checkpoints after `step` without evaluating first (it also checkpoints after
    every evaluation). Trainers whose save needs every rank (FSDP, sharded JAX) gather at these
    steps, since the loop calls save() on rank 0 only."""
    every = cfg.checkpoint_interval or cfg.eval_interval  # 0: only the final checkpoint
    evaluates = cfg.eval_interval and step % cfg.eval_interval == 0
    return bool(every and step % every == 0 and not evaluates)


def run_loop(t: Trainer) -> dict:
    """Run trainer t until its budget is spent; returns a summary (final val loss, steps, timing)."""
    cfg = t.cfg
    if t.step == 0 and t.is_main:
        print(t.describe())
    bar = tqdm(total=cfg.max_steps, initial=t.step, disable=t.quiet or not t.is_main, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    clock, losses, val = _Clock(t.elapsed, t.tokens), [], math.nan
    time_up, last_start = False, None
    try:
        # --- budget: steps, tokens or training seconds, whichever ends first; it drives the lr ---
        while not time_up and not _out_of_budget(t, clock, running=last_start is not None):
            time_up, last_start = _plan_step(t, clock, last_start)
            loss, grad_norm = t.train_step()  # raises NonFiniteLoss before a bad update
            if t.step == 0 and t.is_main and not getattr(t, "pretrained", False):  # fine-tuning: skip
                _check_step0(bar, loss, cfg.model.vocab_size)
            t.step, t.tokens = t.step + 1, t.tokens + cfg.batch_size * cfg.block_size  # global batch
            losses.append(loss)
            # --- a train row every log_interval steps (and after the first) ---
            if row_due(cfg, t.step):
                _log_train(t, bar, clock, loss, grad_norm)
            bar.update(1)
            # --- eval and best (it checkpoints too), or a checkpoint alone ---
            if cfg.eval_interval and t.step % cfg.eval_interval == 0:
                val = _evaluate(t, bar, clock, losses)
            elif checkpoint_due(cfg, t.step):
                t.elapsed = clock.now()
                _checkpoint(t)
        # --- the end: always an eval and a checkpoint of the last step ---
        t.elapsed = clock.pause()
        if not cfg.eval_interval or t.step % cfg.eval_interval:
            val = _evaluate(t, bar, clock, losses)
            t.elapsed = clock.pause()
    except NonFiniteLoss as e:  # --- a NaN: stop, keep the last good checkpoint untouched ---
        bar.close()
        raise SystemExit(_non_finite_message(t, e)) from None
    except KeyboardInterrupt:  # --- Ctrl-C or SIGTERM: save where we are, say how to go on ---
        return _interrupted(t, bar, clock, val)
    bar.close()
    return dict(step=t.step, tokens=t.tokens, val_loss=val, best_val=t.best_val, interrupted=False,
                elapsed=t.elapsed, tokens_per_s=t.tokens / max(t.elapsed, 1e-9))


def _plan_step(t: Trainer, clock: _Clock, last_start: float | None) -> tuple[bool, float]:
    """Set where the lr decay stands for the next step (schedule.schedule_step). Returns (whether a
    time budget makes it the last step, its start). The last step is the one whose expected end
    is nearest to max_time: it runs at the end of the schedule (min_lr), and the run ends about
    half a step from the budget. A step is expected to take as long as the one before."""
    cfg, now = t.cfg, clock.now()
    step_time = 0.0 if last_start is None else now - last_start
    end = now + step_time  # the training seconds expected when this step ends
    last = cfg.max_time is not None and end + step_time / 2 > cfg.max_time
    t.schedule_step = schedule_step(cfg, t.step, t.tokens, cfg.max_time if last else end)
    return last, now


def _out_of_budget(t: Trainer, clock: _Clock, running: bool = False) -> bool:
    """Steps or tokens spent; or the time, checked only before this process's first step (a resumed
    run whose budget is gone). Once running, a time budget ends at the step _plan_step made the
    last: a step slower than the one before can pass max_time unplanned, and then one more step,
    planned last, still ends the run at min_lr."""
    cfg = t.cfg
    return (t.step >= cfg.max_steps or (cfg.max_tokens is not None and t.tokens >= cfg.max_tokens)
            or (not running and cfg.max_time is not None and clock.now() >= cfg.max_time))


def _check_step0(bar, loss: float, vocab_size: int) -> None:
    """An untrained model predicts about uniformly: loss ~ ln(vocab). Far off means a bug upstream."""
    expected = math.log(vocab_size)
    flag = "" if abs(loss - expected) < 0.1 else "  <-- unexpected for an untrained model"
    bar.write(f"step 0 loss {loss:.4f}; ln(vocab_size) = {expected:.4f}{flag}")


def _log_train(t: Trainer, bar, clock: _Clock, loss: float, grad_norm: float) -> None:
    tok_s, lr = clock.tokens_per_s(t.tokens), lr_at(t.step - 1, t.cfg, t.schedule_step)
    if t.is_main:
        extras = t.row_extras() if hasattr(t, "row_extras") else {}  # optional, e.g. MoE expert usage
        t.metrics.append(dict(step=t.step, tokens=t.tokens, train_loss=loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=round(tok_s, 1), time=round(clock.now(), 3), **extras))
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")


def _checkpoint(t: Trainer, best: float | None = None) -> None:
    """The resume point (and best/ with a new best val loss), from rank 0, never of non-finite weights."""
    if not t.is_main:
        return
    if not t.weights_finite():
        raise NonFiniteLoss("finite, but the weights are not")
    if best is not None:
        t.save_best(best)  # first: the resume point records the new best_val
    t.save()


def _evaluate(t: Trainer, bar, clock: _Clock, losses: list[float]) -> float:
    """Validation loss (the clock paused), best/ when it improved, a checkpoint, an eval row, the plot."""
    t.elapsed = clock.pause()
    val = t.evaluate()
    if t.is_main:
        improved = val < t.best_val
        _checkpoint(t, best=val if improved else None)
        t.metrics.append(dict(step=t.step, tokens=t.tokens, val_loss=val, train_loss=None,
                              time=round(t.elapsed, 3)))
        t.metrics.plot(t.run_dir / "loss.png")
        mean = sum(losses) / len(losses) if losses else float("nan")
        bar.write(f"step {t.step:>6} | train {mean:.4f} | val {val:.4f}{' (best)' if improved else ''} | "
                  f"{t.tokens:,} tokens | {t.elapsed:.1f}s")
    losses.clear()
    clock.resume()
    return val


def _non_finite_message(t: Trainer, e: NonFiniteLoss) -> str:
    state = t.run_dir / "trainer_state.json"
    last = f"step {json.loads(state.read_text())['step']}" if state.exists() and t.is_main else "none"
    return (f"minillm train: the loss became non-finite ({e}) at step {t.step}; stopped without writing "
            f"these weights. Last good checkpoint: {t.run_dir} ({last}). Try a lower lr or grad_clip.")


def _interrupted(t: Trainer, bar, clock: _Clock, val: float) -> dict:
    t.elapsed = clock.pause()
    bar.close()
    _checkpoint(t)
    print(f"\ninterrupted: checkpoint saved at step {t.step} in {t.run_dir}; continue with --resume",
          file=sys.stderr)
    return dict(step=t.step, tokens=t.tokens, val_loss=val, interrupted=True, elapsed=t.elapsed)
