"""The rehearsal: simulated AWS notice -> checkpoint -> exit 75 -> replacement resumes -> summary."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from spotsafe import EXIT_PREEMPTED
from spotsafe.rehearsal.rehearse import Outcome, main, read_events, summary

TRAIN = textwrap.dedent("""
    import time, torch
    from torch import nn
    import spotsafe
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(80, 4, generator=g), torch.randint(0, 2, (80,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    run = spotsafe.Run(model=model, optimizer=opt, every_steps=10)
    for epoch in run.epochs(4):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            time.sleep(0.02)
            run.step()
    run.finish()
    print("final", run.step_count, float(sum(p.double().sum() for p in model.parameters())), flush=True)
""")


@pytest.fixture
def train_script(tmp_path: Path) -> list[str]:
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return [sys.executable, str(path)]


def test_rehearsal_preempts_resumes_and_loses_nothing(
    tmp_path: Path, train_script: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    code = main(
        [
            "--notice-after",
            "0",
            "--backoff",
            "0",
            "--store",
            str(tmp_path / "store"),
            "--events",
            str(events),
            "--",
            *train_script,
        ]
    )
    out, err = capfd.readouterr()
    assert code == 0
    recorded = read_events(events)
    (notice,) = [e for e in recorded if e["event"] == "notice"]
    (durable,) = [e for e in recorded if e["event"] == "durable"]
    resumed = [e for e in recorded if e["event"] == "resumed"]
    assert notice["source"] == "aws" and notice["action"] == "terminate"
    assert durable["step"] == notice["step"] >= 1
    assert resumed[-1]["step"] == notice["step"]  # zero steps lost
    assert [e["step"] for e in recorded if e["event"] == "complete"] == [80]
    # handled well inside the deadline
    assert notice["deadline"] - durable["time"] > 60
    # what the user reads
    assert f"instance 1 exited {EXIT_PREEMPTED}" in err
    assert "spotsafe rehearsal summary" in out
    assert "instances launched: 2" in out
    assert f"resumed at:         step {notice['step']}" in out
    assert "steps lost:         0" in out
    assert "run complete:       step 80" in out
    # the final line of the run: the store given was used and kept
    assert (tmp_path / "store" / "COMPLETE.json").exists()


def test_summary_reports_lost_steps_and_missing_durability() -> None:
    t = 1000.0
    events = [
        {"event": "start", "pid": 1, "time": t, "step": 0},
        {
            "event": "notice",
            "pid": 1,
            "time": t + 21,
            "step": 50,
            "epoch": 1,
            "batch": 5,
            "source": "aws",
            "action": "terminate",
            "deadline": t + 140,
        },
        {"event": "durable", "pid": 1, "time": t + 22, "step": 50, "seconds": 0.5},
        {"event": "resumed", "pid": 2, "time": t + 30, "step": 48, "epoch": 1, "batch": 3},
        {"event": "complete", "pid": 2, "time": t + 60, "step": 100, "epoch": 3},
    ]
    text = summary(Outcome(0, 2, [t + 20], events), launched_at=t, store="S")
    assert "steps lost:         2" in text
    assert "seen by the run:    +1.00 s, at step 50 (epoch 1, batch 5)" in text
    assert "2.00 s after the notice appeared" in text
    assert "118.0 s to spare" in text
    text = summary(Outcome(1, 1, [t + 20], events[:2]), launched_at=t, store="S")
    assert "checkpoint durable: NO" in text


def test_rehearsal_through_simulate_module(tmp_path: Path) -> None:
    from spotsafe.rehearsal.cli import main as simulate_main

    with pytest.raises(SystemExit) as e:
        simulate_main(["rehearse", "--notice-after", "0"])
    assert e.value.code == 2  # no command given: a usage error, from the rehearsal's own parser


LONG_TRAIN = TRAIN.replace("run.epochs(4)", "run.epochs(30)")  # 600 steps of ~20 ms


@pytest.mark.slow
def test_notice_after_steps_counts_from_where_each_instance_resumed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "train.py"
    script.write_text(LONG_TRAIN)
    events = tmp_path / "events.jsonl"
    code = main(
        [
            "--notice-after-steps",
            "10",
            "--preemptions",
            "2",
            "--backoff",
            "0",
            "--store",
            str(tmp_path / "store"),
            "--events",
            str(events),
            "--",
            sys.executable,
            str(script),
        ]
    )
    out, err = capfd.readouterr()
    assert code == 0, f"{out}{err}"
    recorded = read_events(events)
    reached = [e for e in recorded if e["event"] == "reached"]
    notices = [e for e in recorded if e["event"] == "notice"]
    resumed = [e for e in recorded if e["event"] == "resumed"]
    assert len(reached) == 2 and len(notices) == 2
    assert reached[0]["step"] == 10  # a fresh run: step 10
    assert reached[1]["step"] == notices[0]["step"] + 10  # 10 steps after the step it resumed from
    assert reached[0]["step"] <= notices[0]["step"] < reached[1]["step"] <= notices[1]["step"]
    assert [e["step"] for e in resumed] == [n["step"] for n in notices]  # zero steps lost, twice
    assert notices[0]["time"] >= reached[0]["time"]
    assert err.count("notice will appear once the run has taken 10 steps") == 2
    assert "(10 steps in): the spot 'terminate' notice appears now" in err
    assert out.count("steps lost:         0") == 2
    assert "instances launched: 3" in out
    assert "run complete:       step 600" in out


def test_notice_after_steps_past_the_end_says_so(
    tmp_path: Path, train_script: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["--notice-after-steps", "100000", "--backoff", "0", "--store", str(tmp_path / "store"), "--", *train_script]
    )
    out, _ = capfd.readouterr()
    assert code == 0
    assert "the run ended within 100000 steps, so no notice appeared: try a smaller --notice-after-steps" in out


def test_notice_options_are_checked(capfd: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--notice-after-steps", "0", "--", "true"],
        ["--notice-after-steps", "5", "--notice-after", "1", "--", "true"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    err = capfd.readouterr().err
    assert "--notice-after-steps must be >= 1" in err
    assert "not allowed with argument" in err


def test_the_after_steps_setting_is_checked() -> None:
    from spotsafe.settings import Settings

    assert Settings.from_env({}).rehearsal_after_steps is None
    assert Settings.from_env({"SPOTSAFE_REHEARSAL_AFTER_STEPS": "300"}).rehearsal_after_steps == 300
    with pytest.raises(ValueError, match="SPOTSAFE_REHEARSAL_AFTER_STEPS='abc' is not a number of steps"):
        Settings.from_env({"SPOTSAFE_REHEARSAL_AFTER_STEPS": "abc"})
    with pytest.raises(ValueError, match="SPOTSAFE_REHEARSAL_AFTER_STEPS='0' must be >= 1 step"):
        Settings.from_env({"SPOTSAFE_REHEARSAL_AFTER_STEPS": "0"})
