"""The outer loop of training: budget, progress bar, evaluation, checkpoints, Ctrl-C, NaN guard."""

from __future__ import annotations

import json
import math
import sys
import time

from tqdm import tqdm

from minillm.schedule import lr_at


class NonFiniteLoss(RuntimeError):
    """The loss became inf or NaN; the step's update is not applied."""


def _budget_left(t, started: float) -> bool:
    cfg = t.cfg
    if t.step >= cfg.max_steps:
        return False
    if cfg.max_tokens is not None and t.tokens >= cfg.max_tokens:
        return False
    return cfg.max_time is None or t.elapsed + (time.perf_counter() - started) < cfg.max_time


def _log(t, row: dict) -> None:
    if t.is_main:
        t.metrics.append(row)


def _eval_and_checkpoint(t, bar, train_losses: list[float]) -> float:
    val = t.evaluate()
    train = sum(train_losses) / len(train_losses) if train_losses else float("nan")
    if t.is_main:
        improved = val < t.best_val
        if improved:
            t._save_best(val)
        t.save()
        _log(t, dict(step=t.step, tokens=t.tokens, val_loss=val, train_loss=None, time=round(t.elapsed, 3)))
        t.metrics.plot(t.run_dir / "loss.png")
        bar.write(f"step {t.step:>6} | train {train:.4f} | val {val:.4f}{' (best)' if improved else ''} | "
                  f"{t.tokens:,} tokens | {t.elapsed:.1f}s")
    return val


def run_loop(t) -> dict:
    """Run Trainer t until its budget is spent; returns a summary (final val loss, steps, timing)."""
    cfg = t.cfg
    tokens_per_step = cfg.batch_size * cfg.block_size
    ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
    bar = tqdm(total=cfg.max_steps, initial=t.step, disable=t.quiet or not t.is_main, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    train_losses: list[float] = []
    val = math.nan
    started, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
    t.model.train()
    try:
        while _budget_left(t, started):
            loss, grad_norm = t.train_step()
            if t.step == 0 and t.is_main:
                expected = math.log(cfg.model.vocab_size)
                flag = "" if abs(loss - expected) < 0.1 else "  <-- unexpected for an untrained model"
                bar.write(f"step 0 loss {loss:.4f}; ln(vocab_size) = {expected:.4f}{flag}")
            t.step += 1
            t.tokens += tokens_per_step
            window_tokens += tokens_per_step
            train_losses.append(loss)
            if t.step % cfg.log_interval == 0 or t.step == 1:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                _log(t, dict(step=t.step, tokens=t.tokens, train_loss=loss, lr=lr_at(t.step - 1, cfg),
                             grad_norm=grad_norm, tokens_per_s=round(tok_s, 1),
                             time=round(t.elapsed + now - started, 3)))
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_at(t.step - 1, cfg):.2e}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if cfg.eval_interval and t.step % cfg.eval_interval == 0:
                t.elapsed += time.perf_counter() - started  # evaluation time is not training time
                val = _eval_and_checkpoint(t, bar, train_losses)
                train_losses, started = [], time.perf_counter()
                window_start, window_tokens = started, 0
            elif ckpt_every and t.step % ckpt_every == 0:  # 0: only the final checkpoint
                t.elapsed += time.perf_counter() - started
                started = time.perf_counter()
                t.save()
    except NonFiniteLoss as e:
        bar.close()
        state = t.run_dir / "trainer_state.json"
        last = f"step {json.loads(state.read_text())['step']}" if state.exists() and t.is_main else "none"
        raise SystemExit(
            f"minillm train: the loss became non-finite ({e}) at step {t.step}; stopped without writing "
            f"these weights. Last good checkpoint: {t.run_dir} ({last}). Try a lower lr or grad_clip.") from None
    except KeyboardInterrupt:
        t.elapsed += time.perf_counter() - started
        bar.close()
        t.save()
        print(f"\ninterrupted: checkpoint saved at step {t.step} in {t.run_dir}; continue with --resume",
              file=sys.stderr)
        return dict(step=t.step, tokens=t.tokens, val_loss=val, interrupted=True, elapsed=t.elapsed)
    t.elapsed += time.perf_counter() - started
    if not cfg.eval_interval or t.step % cfg.eval_interval:  # always end on an eval + checkpoint
        val = _eval_and_checkpoint(t, bar, train_losses)
    bar.close()
    return dict(step=t.step, tokens=t.tokens, val_loss=val, best_val=t.best_val, interrupted=False,
                elapsed=t.elapsed, tokens_per_s=t.tokens / max(t.elapsed, 1e-9))
