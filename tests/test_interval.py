"""every="auto": the Young–Daly interval from measured save costs and the interruption rate."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from torch import nn

from spotsafe import Run
from spotsafe.interval import (
    DEFAULT_RATE_PER_HOUR,
    MAX_SECONDS,
    MIN_SECONDS,
    PRIOR_HOURS,
    AutoInterval,
    History,
    rate_per_hour,
    young_daly,
)


def test_young_daly_is_sqrt_of_twice_cost_times_mtbf() -> None:
    # 10 s save, one interruption every 5 hours: sqrt(2 * 10 * 18000) = 600 s
    assert young_daly(10.0, 0.2) == pytest.approx(600.0)
    assert young_daly(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="rate"):
        young_daly(1.0, 0.0)


def test_rates_from_numbers_and_spot_advisor_buckets() -> None:
    assert rate_per_hour(0.05) == 0.05
    # ">20%" a month stands for 25%: -ln(0.75) / 730 h
    assert rate_per_hour(">20%") == pytest.approx(-math.log(0.75) / 730)
    assert rate_per_hour("5-10%") < rate_per_hour("10-15%") < rate_per_hour("15-20%")
    for bad in ("often", 0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="interruption_rate"):
            rate_per_hour(bad)  # type: ignore[arg-type]  # bad input on purpose


def test_interval_follows_measured_cost_within_bounds() -> None:
    policy = AutoInterval(0.2)  # one interruption every 5 h
    assert MIN_SECONDS <= policy.seconds <= MAX_SECONDS
    policy.observe_save(stall_s=10.0, write_s=5.0)
    # first measurement replaces the initial guess
    assert policy.seconds == pytest.approx(young_daly(10.0, 0.2))
    assert policy.observe_save(stall_s=1e-4, write_s=0.01) is not None  # moving average: 5 s
    assert policy.seconds == pytest.approx(young_daly(policy.cost_s, 0.2))
    for _ in range(20):
        policy.observe_save(stall_s=1e-4, write_s=0.01)
    assert policy.seconds == MIN_SECONDS  # tiny cost: the lower bound
    rare = AutoInterval("<5%")
    rare.observe_save(stall_s=30.0, write_s=1.0)
    assert rare.seconds == MAX_SECONDS  # rare interruptions, costly save: the upper bound
    slow_write = AutoInterval(1.0, min_seconds=1.0)
    slow_write.observe_save(stall_s=0.01, write_s=400.0)
    assert slow_write.seconds == 800.0  # never shorter than twice the write: saves must not queue up
    with pytest.raises(ValueError, match="min_seconds"):
        AutoInterval(min_seconds=100, max_seconds=10)


def test_overlap_slowdown_counts_as_cost() -> None:
    policy = AutoInterval(1.0)
    for _ in range(10):
        policy.observe_step(0.10, saving=False)
        policy.observe_step(0.15, saving=True)
    # a 3 s write slows the 20 steps it overlaps by 0.05 s each: 1 s
    assert policy.interference(3.0) == pytest.approx(1.0)
    policy.observe_save(stall_s=0.5, write_s=3.0)
    assert policy.cost_s == pytest.approx(1.5)


def test_history_refines_the_prior_and_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    policy = AutoInterval()
    assert policy.rate_per_hour == pytest.approx(DEFAULT_RATE_PER_HOUR)
    policy.observe_save(stall_s=2.0, write_s=1.0)
    before = policy.seconds
    with caplog.at_level(logging.INFO, logger="spotsafe.interval"):
        # 30 hours, 12 interruptions: (12 + 0.1 * 10) / (30 + 10) = 0.325 / h
        changed = policy.observe_history(History(30 * 3600.0, 12))
    assert policy.rate_per_hour == pytest.approx((12 + DEFAULT_RATE_PER_HOUR * PRIOR_HOURS) / 40)
    assert changed is not None and changed < before
    assert "checkpoint interval" in caplog.text and "history" in caplog.text
    # a change within 20% is not worth a log line or a new cadence
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spotsafe.interval"):
        assert policy.observe_save(stall_s=2.1, write_s=1.0) is None
    assert caplog.text == ""


def test_history_round_trips_and_tolerates_junk() -> None:
    h = History(12.5, 3)
    assert History.from_dict(h.to_dict()) == h
    assert History.from_dict(None) == History()
    assert History.from_dict({"seconds": "x"}) == History()


def test_run_defaults_to_auto_and_counts_relaunches(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    run = Run(tmp_path, model=model, watch=False, interruption_rate="10-15%")
    assert run.interval is not None and run.every_seconds is None
    assert run.interval.prior_rate == pytest.approx(rate_per_hour("10-15%"))
    for _ in range(3):
        run.step()
    run.save()
    run.checkpointer.wait()
    run.step()  # the save landed: its measured cost feeds the interval
    assert run.interval._measured
    run.close()
    # a relaunch (the previous process never finished) is one interruption in the store's history
    again = Run(tmp_path, model=nn.Linear(4, 2), watch=False)
    assert again.interval is not None
    assert again.interval.history.interruptions == 1
    assert again.interval.history.seconds > 0
    again.save()
    again.close()
    third = Run(tmp_path, model=nn.Linear(4, 2), watch=False)
    assert third.interval is not None and third.interval.history.interruptions == 2
    third.close()
    with pytest.raises(ValueError, match="every_seconds"):
        Run(tmp_path, model=model, watch=False, every="auto", every_seconds=10)
    with pytest.raises(ValueError, match="every must be"):
        Run(tmp_path, model=model, watch=False, every="often")  # type: ignore[arg-type]  # bad input on purpose
    with pytest.raises(ValueError, match="interruption_rate"):
        Run(tmp_path, model=model, watch=False, every_steps=5, interruption_rate=0.1)
    fixed = Run(tmp_path / "fixed", model=model, watch=False, every_seconds=30)
    assert fixed.interval is None
    fixed.close()
