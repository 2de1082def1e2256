"""The outer loop of JAX training: budget, progress bar, evaluation, checkpoints, Ctrl-C, NaN guard.

It writes the rows the PyTorch loop writes to metrics.jsonl (train rows: step, tokens,
train_loss, lr, grad_norm, tokens_per_s, time; eval rows: step, tokens, val_loss, time), so
plots and tools read runs of either framework alike. Evaluation time is not training time.
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

from minillm.schedule import lr_at


class NonFiniteLoss(RuntimeError):
    """The loss became inf or NaN; the step's update was not applied."""


class _Clock:
    """Training seconds: `elapsed` from earlier sessions plus the running stretch, paused for evals."""

    def __init__(self, elapsed: float):
        self.before, self.start = elapsed, time.perf_counter()

    def now(self) -> float:
        return self.before + time.perf_counter() - self.start

    def pause(self) -> float:
        self.before, self.start = self.now(), time.perf_counter()
        return self.before

    def resume(self) -> None:
        self.start = time.perf_counter()


def _out_of_budget(t, clock: _Clock) -> bool:
    cfg = t.cfg
    return (t.step >= cfg.max_steps or (cfg.max_tokens is not None and t.tokens >= cfg.max_tokens)
            or (cfg.max_time is not None and clock.now() >= cfg.max_time))


def _evaluate(t, bar, clock: _Clock, losses: list[float]) -> float:
    """Validation loss, best/ when it improved, a checkpoint, an eval row and the plot."""
    t.elapsed = clock.pause()
    val = t.evaluate()
    if t.is_main:
        improved = val < t.best_val
        if improved:
            t._save_best(val)
        t.save()
        t.metrics.append(dict(step=t.step, tokens=t.tokens, val_loss=val, train_loss=None, time=round(t.elapsed, 3)))
        t.metrics.plot(t.run_dir / "loss.png")
        mean = sum(losses) / len(losses) if losses else float("nan")
        bar.write(f"step {t.step:>6} | train {mean:.4f} | val {val:.4f}{' (best)' if improved else ''} | "
                  f"{t.tokens:,} tokens | {t.elapsed:.1f}s")
    losses.clear()
    clock.resume()
    return val


def _one_step(t, bar) -> tuple[float, float]:
    try:
        return t.train_step()
    except NonFiniteLoss as e:
        raise SystemExit(
            f"minillm train: loss became {e} at step {t.step}; stopping without writing these weights. "
            f"Last good checkpoint: {t.run_dir}. Try a lower lr or grad_clip.") from None


def run_loop(t) -> dict:
    """Run Trainer t (minillm.jax.train.Trainer) until its budget is spent; returns a summary."""
    cfg = t.cfg
    tokens_per_step = cfg.batch_size * cfg.block_size
    every_ckpt = cfg.checkpoint_interval or cfg.eval_interval
    bar = tqdm(total=cfg.max_steps, initial=t.step, disable=t.quiet or not t.is_main, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    clock, losses, val = _Clock(t.elapsed), [], math.nan
    window = (time.perf_counter(), 0)  # (start, tokens) of the throughput window
    try:
        while not _out_of_budget(t, clock):
            loss, grad_norm = _one_step(t, bar)
            if t.step == 0 and t.is_main:
                bar.write(f"step 0 loss {loss:.4f}; ln(vocab_size) = {math.log(cfg.model.vocab_size):.4f}")
            t.step, t.tokens = t.step + 1, t.tokens + tokens_per_step
            window = (window[0], window[1] + tokens_per_step)
            losses.append(loss)
            if t.is_main and (t.step % cfg.log_interval == 0 or t.step == 1):
                tok_s = window[1] / max(time.perf_counter() - window[0], 1e-9)
                t.metrics.append(dict(step=t.step, tokens=t.tokens, train_loss=loss, lr=lr_at(t.step - 1, cfg),
                                      grad_norm=grad_norm, tokens_per_s=round(tok_s, 1), time=round(clock.now(), 3)))
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_at(t.step - 1, cfg):.2e}", tok_s=f"{tok_s:,.0f}")
                window = (time.perf_counter(), 0)
            bar.update(1)
            if cfg.eval_interval and t.step % cfg.eval_interval == 0:
                val = _evaluate(t, bar, clock, losses)
                window = (time.perf_counter(), 0)
            elif every_ckpt and t.step % every_ckpt == 0:  # 0: only the final checkpoint
                t.elapsed = clock.now()
                t.save()
    except KeyboardInterrupt:
        t.elapsed = clock.pause()
        bar.close()
        t.save()
        print(f"\ninterrupted: checkpoint saved at step {t.step} in {t.run_dir}; continue with --resume",
              file=sys.stderr)
        return dict(step=t.step, tokens=t.tokens, val_loss=val, interrupted=True, elapsed=t.elapsed)
    t.elapsed = clock.pause()
    if not cfg.eval_interval or t.step % cfg.eval_interval:  # always end on an eval + checkpoint
        val = _evaluate(t, bar, clock, losses)
        t.elapsed = clock.pause()
    bar.close()
    return dict(step=t.step, tokens=t.tokens, val_loss=val, best_val=t.best_val, interrupted=False,
                elapsed=t.elapsed, tokens_per_s=t.tokens / max(t.elapsed, 1e-9))
