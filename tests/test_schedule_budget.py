"""Budgets drive the learning-rate schedule (minillm.schedule.schedule_step): the decay follows the
fraction of whichever budget (steps, tokens, training seconds) binds, so a run cut by max_time or
max_tokens still ends its decay at min_lr. Expected values are the papers' formulas worked by hand."""

import math

import pytest

from minillm.config import ModelConfig, TrainConfig
from minillm.schedule import lr_at, schedule_step


def _cfg(**kw) -> TrainConfig:
    base = dict(model=ModelConfig(vocab_size=50), batch_size=2, block_size=8, lr=1e-3, min_lr=1e-4,
                warmup_steps=10, max_steps=1000)
    return TrainConfig(**{**base, **kw})


def test_a_step_budget_is_the_step_itself():
    cfg = _cfg()
    assert [schedule_step(cfg, s) for s in (0, 10, 500, 999, 1000)] == [0, 10, 500, 999, 1000]
    assert all(lr_at(s, cfg, schedule_step(cfg, s)) == lr_at(s, cfg) for s in range(0, 1001, 7))


def test_a_token_budget_that_binds_first():
    cfg = _cfg(max_tokens=16 * 100)  # 16 tokens a step: the budget ends at step 100 of 1000
    assert schedule_step(cfg, 0, 0) == 0
    assert schedule_step(cfg, 50, 16 * 50) == pytest.approx(500)  # half the tokens: half of max_steps
    assert schedule_step(cfg, 100, 16 * 100) == pytest.approx(1000)  # the end: the end of the schedule
    assert schedule_step(cfg, 120, 16 * 120) == pytest.approx(1000)  # never past it


def test_a_time_budget_that_binds_first_and_whichever_is_furthest():
    cfg = _cfg(max_time=60.0, max_tokens=16 * 400)
    assert schedule_step(cfg, 20, 16 * 20, 30.0) == pytest.approx(500)  # time (1/2) ahead of tokens (1/20)
    assert schedule_step(cfg, 300, 16 * 300, 30.0) == pytest.approx(750)  # tokens (3/4) ahead of time
    assert schedule_step(cfg, 20, 16 * 20, 60.0) == pytest.approx(1000)


def test_warmup_counts_real_steps_and_the_decay_the_budget():
    wsd = _cfg(schedule="wsd", decay_frac=0.2, max_time=100.0)
    assert lr_at(3, wsd, position=990.0) == pytest.approx(1e-3 * 4 / 11)  # still warming up
    assert lr_at(30, wsd, schedule_step(wsd, 30, 0, 79.0)) == pytest.approx(1e-3)  # before the decay
    assert lr_at(30, wsd, schedule_step(wsd, 30, 0, 80.0)) == pytest.approx(1e-3)  # the decay starts
    assert lr_at(30, wsd, schedule_step(wsd, 30, 0, 90.0)) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway
    assert lr_at(30, wsd, schedule_step(wsd, 30, 0, 100.0)) == pytest.approx(1e-4)  # the floor
    cosine = _cfg(max_time=100.0)  # cosine over positions 10 .. 1000
    mid = 10 + 0.5 * 990
    assert lr_at(30, cosine, mid) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(30, cosine, schedule_step(cosine, 30, 0, 25.0)) == pytest.approx(
        1e-4 + 0.5 * (1 + math.cos(math.pi * (250 - 10) / 990)) * 9e-4)
