"""What a script nobody here wrote needs from a Run (issue 29): an early first checkpoint, the loop's
own state kept (``run.state``), batch indices and epoch numbers that continue after a resume, a
resume line a user sees with no logging configured, and an index range that is skipped, not replayed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from spotsafe import Run
from spotsafe.interval import MIN_SECONDS, AutoInterval, young_daly

PY = sys.executable


# -- the first periodic checkpoint -----------------------------------------------------------


def test_the_first_periodic_checkpoint_comes_after_a_warm_up(caplog: pytest.LogCaptureFixture) -> None:
    """Fails on main: with no save measured the interval was sqrt(2 x 1 s x 10 h) = 268 s."""
    with caplog.at_level(logging.INFO, logger="spotsafe.interval"):
        policy = AutoInterval()
    assert policy.seconds == MIN_SECONDS
    assert "first checkpoint after 60 s: a warm-up that measures the save cost" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spotsafe.interval"):
        policy.observe_save(stall_s=0.5, write_s=1.0)
    # the measured cost now decides, and the line says so even where the bounds keep the number
    assert policy.seconds == pytest.approx(young_daly(0.5, policy.rate_per_hour))
    assert "(first save measured; Young-Daly: save cost 0.500 s" in caplog.text
    tiny = AutoInterval()
    with caplog.at_level(logging.INFO, logger="spotsafe.interval"):
        assert tiny.observe_save(stall_s=0.001, write_s=0.01) == MIN_SECONDS
    assert "checkpoint interval 60 s -> 60 s (first save measured" in caplog.text


def test_a_run_saves_once_the_warm_up_has_passed(tmp_path: Path) -> None:
    run = Run(tmp_path, model=nn.Linear(2, 2), watch=False)
    run.step()
    assert run.checkpointer.list() == []
    run._cadence.last_save = time.monotonic() - (MIN_SECONDS + 1)  # a minute of training went by
    run.step()
    run.checkpointer.wait()
    (info,) = run.checkpointer.list()
    assert (info.step, info.reason) == (2, "periodic")
    run.close()


# -- run.state, run.enumerate, run.epochs(start=1) --------------------------------------------


def _lstm_run(store: Path, stop_at: int | None) -> tuple[list[tuple[int, int]], dict[str, object], nn.LSTM]:
    """A tiny LSTM trained on a fixed sequence, its hidden state carried across batches in run.state."""
    torch.manual_seed(0)
    model = nn.LSTM(3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = list(torch.randn(4, 5, 1, 3))  # 4 batches of a 5-step sequence (drawn before Run restores the RNGs)
    state = {"lr": 0.1, "best": None, "hidden": None}
    run = Run(store, model=model, optimizer=opt, state=state, watch=False, every_steps=3)
    seen: list[tuple[int, int]] = []
    for epoch in run.epochs(2, start=1):
        for i, x in run.enumerate(data):
            hidden = state["hidden"]
            out, (h, c) = model(x, hidden)
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            state["hidden"] = (h.detach(), c.detach())
            seen.append((epoch, i))
            run.step(loss=loss.item())
            if stop_at is not None and run.step_count == stop_at:
                run.checkpointer.wait()
                run.close()  # a kill after the checkpoint of step 6 (every_steps=3)
                return seen, state, model
        state["hidden"] = None
        state["lr"] /= 4.0
        for group in opt.param_groups:
            group["lr"] = state["lr"]
        best = state["best"]
        state["best"] = loss.item() if not isinstance(best, float) else min(best, loss.item())
    run.finish()
    return seen, state, model


def test_the_loops_own_state_batch_index_and_epoch_numbers_survive_a_resume(tmp_path: Path) -> None:
    """Fails on main: Run(state=...) did not exist, extra_state was a copy, run.enumerate and
    epochs(start=) did not exist, and enumerate(run.batches(...)) restarted at 0."""
    seen_plain, state_plain, plain = _lstm_run(tmp_path / "plain", None)
    assert seen_plain[:2] == [(1, 0), (1, 1)] and seen_plain[-1] == (2, 3)
    first, state_first, _ = _lstm_run(tmp_path / "resumed", 7)  # killed at 7, after a save at 6 (or 7)
    assert state_first["lr"] == pytest.approx(0.025)  # the first epoch's annealing happened
    second, state_second, resumed = _lstm_run(tmp_path / "resumed", None)
    saved = len(seen_plain) - len(second)  # the step the second launch resumed from
    # 6 or 7 (mid-epoch 2, steps 5-8; a save due while one is in flight waits a step), or 3 when the
    # async save of step 3 was still in flight at steps 6 and 7 (a loaded machine)
    assert saved in (3, 6, 7)
    # the resumed launch's first batch index continues its epoch (enumerate(run.batches()) said 0)
    assert second[0] == (1 + saved // 4, saved % 4)
    assert first[:saved] + second == seen_plain
    assert state_second["lr"] == state_plain["lr"] and state_second["best"] == state_plain["best"]
    for a, b in zip(plain.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_state_keys_reserved_by_the_run_are_refused(tmp_path: Path) -> None:
    run = Run(tmp_path, model=nn.Linear(2, 2), watch=False)
    run.state["rng"] = 1
    with pytest.raises(ValueError, match=r"run.state keys \['rng'\] are reserved"):
        run.save()
    del run.state["rng"]
    run.close()
    with pytest.raises(ValueError, match="not both"):
        Run(tmp_path, state={}, extra_state={}, watch=False)


# -- run.batches(range(n)) ----------------------------------------------------------------


def test_an_index_range_is_skipped_not_replayed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fails on main: the consumed indices were iterated again and dropped, with a warning."""
    run = Run(tmp_path, model=nn.Linear(2, 2), watch=False, every_steps=1000)
    for i in run.batches(range(10)):
        run.step()
        if i == 3:
            break
    run.save()
    run.close()
    with caplog.at_level(logging.WARNING):
        again = Run(tmp_path, model=nn.Linear(2, 2), watch=False)
        rest = list(again.batches(range(10)))
        lists = list(again.batches([10, 11, 12]))
    assert rest == [4, 5, 6, 7, 8, 9]
    assert lists == [10, 11, 12]  # the next epoch, from its start
    assert "replaying" not in caplog.text
    again.step(loss=float("nan"))  # a diverged loss (kept as text in the manifest) must not fail the save
    again.save(async_=False)
    latest = again.checkpointer.latest()
    assert latest is not None and latest.step == again.step_count
    again.close()


# -- the resume line ---------------------------------------------------------------------------

RESUMING = """
    import sys, torch, spotsafe
    run = spotsafe.Run(sys.argv[1], model=torch.nn.Linear(2, 2), watch=False)
    run.step()
    run.save()
    run.close()
"""


def test_a_resumed_process_says_so_on_stderr_once(tmp_path: Path) -> None:
    """Fails on main: 'resuming from step N' was an INFO log record nobody had configured to show."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(RESUMING))
    env = {k: v for k, v in os.environ.items() if k != "SPOTSAFE_QUIET"}
    cmd = [PY, str(script), str(tmp_path / "store")]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    assert "resuming" not in first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    (line,) = [ln for ln in second.stderr.splitlines() if "resuming from" in ln]
    assert line.startswith(f"spotsafe: resuming from step 1 (epoch 0, batch 0) at {tmp_path / 'store'}/")
    quiet = subprocess.run(cmd, env={**env, "SPOTSAFE_QUIET": "1"}, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and "resuming" not in quiet.stderr


def test_the_resume_line_is_not_doubled_where_logging_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    first = Run(tmp_path, model=nn.Linear(2, 2), watch=False)
    first.save()
    first.close()
    with caplog.at_level(logging.INFO, logger="spotsafe.run"):
        Run(tmp_path, model=nn.Linear(2, 2), watch=False).close()
    assert "resuming from step 0" in caplog.text
    assert "resuming" not in capsys.readouterr().err
