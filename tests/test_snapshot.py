"""In-memory snapshots: a notice shorter than a step still leaves a durable checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from torch import nn

from spotsafe import Run
from spotsafe.checkpoint import Checkpointer
from spotsafe.interruption import InterruptionWatcher, Notice
from spotsafe.snapshot import SnapshotKeeper
from tests.helpers import wait_until

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from torch import nn
    import spotsafe
    out = sys.argv[1]
    torch.manual_seed(int(sys.argv[2]))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(42)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    step_s = float(os.environ.get("STEP_SECONDS", "0"))
    # From step 6 on, longer still: the test's kill at the deadline then never races the step's end.
    late_s = float(os.environ.get("LATE_STEP_SECONDS", step_s))
    run = spotsafe.Run(model=model, optimizer=opt)  # every="auto", snapshot_every="auto": the defaults
    for epoch in run.epochs(3):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            end = time.monotonic() + (step_s if run.step_count < 5 else late_s)  # Python-level work, as a forward pass
            while time.monotonic() < end:
                time.sleep(0.02)
            run.step()
            Path(out + ".step").write_text(str(run.step_count))
    run.finish()
    torch.save(model.state_dict(), out)
""")


def child(tmp_path: Path, store: Path, out: Path, init: int, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(init)],
        text=True,
        env={**os.environ, "SPOTSAFE_STORE": str(store), "SPOTSAFE_SOURCES": "signal", **env},
        stderr=subprocess.PIPE,
    )


def test_notice_shorter_than_a_step_persists_the_snapshot_before_the_kill(tmp_path: Path) -> None:
    # The uninterrupted reference.
    ref = child(tmp_path, tmp_path / "ref", tmp_path / "ref.pt", 0)
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, f"{err}"

    # Steps of 3 s (step 6: 8 s), a SIGTERM early in step 6 with 2 s of grace, SIGKILL at the deadline:
    # the step cannot reach run.step() in time, and no periodic save is due (every="auto" >= 60 s).
    grace = 2.0
    events = tmp_path / "events.jsonl"
    out = tmp_path / "a.pt"
    proc = child(
        tmp_path,
        tmp_path / "store",
        out,
        0,
        STEP_SECONDS="3",
        LATE_STEP_SECONDS="8",
        SPOTSAFE_SIGNAL_GRACE=str(grace),
        SPOTSAFE_EVENTS=str(events),
    )

    def at_step_5() -> bool:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        path = Path(str(out) + ".step")
        return path.exists() and path.read_text() == "5"

    wait_until(at_step_5, 120, interval=0.01, what="step 5 done")
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    killed_at = time.monotonic()
    proc.kill()
    _, err = proc.communicate(timeout=30)
    # It was still inside step 6 at the deadline (else the test proves nothing about the snapshot path).
    assert proc.returncode == -signal.SIGKILL, f"{err}"
    assert killed_at >= deadline - 0.05
    assert Path(str(out) + ".step").read_text() == "5", "step 6 finished before the kill"

    ckpt = Checkpointer(tmp_path / "store")
    newest = ckpt.latest(verify=True)
    assert newest is not None, f"{err}"
    assert (newest.step, newest.reason, newest.metadata.get("snapshot")) == (5, "notice", True)
    ckpt.close()
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    durable = next(e for e in recorded if e["event"] == "snapshot_durable")
    assert durable["step"] == 5
    assert durable["seconds"] < grace

    # The replacement (another init) resumes at most one snapshot behind and ends bit-identical.
    proc = child(tmp_path, tmp_path / "store", tmp_path / "b.pt", 99, SPOTSAFE_EVENTS=str(events))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{err}"
    resumed = [json.loads(line) for line in events.read_text().splitlines() if '"resumed"' in line]
    assert resumed[-1]["step"] == 5
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "b.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}"


def quiet_watcher() -> InterruptionWatcher:
    return InterruptionWatcher(sources="none", signals=())


def small_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, 8)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_notice_the_step_can_meet_leaves_the_save_to_the_run(tmp_path: Path) -> None:
    model, opt = small_model()
    watcher = quiet_watcher()
    run = Run(
        tmp_path, model=model, optimizer=opt, watch=watcher, exit_on_notice=False, every_steps=1000, snapshot_every=1
    )
    assert run.snapshots is not None
    for _ in range(3):
        train_step(model, opt)
        run.step()
    assert run.snapshots.held_step == 3
    watcher.trigger("terminate", deadline_in=60)  # plenty of time: the step reaches run.step()
    time.sleep(0.3)  # the guard decides in this window; it must not persist
    train_step(model, opt)
    run.step()
    assert run.should_stop
    assert run.snapshots.persisted is None
    infos = run.checkpointer.list()
    assert [(i.step, i.reason, i.metadata.get("snapshot")) for i in infos] == [(4, "notice", None)]
    run.close()


def test_a_stuck_step_gets_the_snapshot_persisted_before_the_deadline(tmp_path: Path) -> None:
    model, opt = small_model()
    watcher = quiet_watcher()
    run = Run(
        tmp_path, model=model, optimizer=opt, watch=watcher, exit_on_notice=False, every_steps=1000, snapshot_every=1
    )
    keeper = run.snapshots
    assert keeper is not None
    for _ in range(4):
        train_step(model, opt)
        run.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt)  # step 5 is under way and "hangs" (an evaluation pass, a compile)
    watcher.trigger("terminate", deadline_in=3.0)
    wait_until(lambda: keeper.persisted is not None, 30, what="the snapshot persisted")
    assert keeper.persisted is not None and keeper.persisted[0] == 4
    ckpt = Checkpointer(tmp_path)
    info = ckpt.latest(verify=True)
    assert info is not None and (info.step, info.reason) == (4, "notice")
    saved = ckpt.load(info)["model"]
    for k, v in expected.items():
        assert torch.equal(saved[k], v), f"{k}"  # the state at step 4, not the live one
    ckpt.close()
    run.step()  # the step ends: the Run saves step 5 on the notice as well
    assert run.should_stop
    assert [i.step for i in run.checkpointer.list()] == [4, 5]
    run.close()


def test_snapshot_every_auto_keeps_the_stall_under_budget_and_can_be_off(tmp_path: Path) -> None:
    model = nn.Linear(1024, 1024)  # 4 MiB of weights: a copy that is measurable against a 1 ms step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(tmp_path, model=model, optimizer=opt, watch=False, every_steps=10_000)
    keeper = run.snapshots
    assert keeper is not None and keeper.every == 1
    for _ in range(40):
        time.sleep(0.001)
        run.step()
    assert keeper._copy_s is not None and keeper.step_time is not None
    assert keeper.every > 1  # copying 4 MiB costs more than 2% of a ~1 ms step
    assert 1 <= keeper.taken <= 2 and keeper.stall_total_s >= keeper.first_stall_s > 0
    # the rule on fixed measurements: every = ceil(copy / (2% of a step)), 1 at least
    keeper._step_times.clear()
    keeper._step_times.extend([0.5] * 5)
    keeper._copy_s = 0.045
    keeper._retune()
    assert keeper.every == 5
    keeper._copy_s = 0.0001
    keeper._retune()
    assert keeper.every == 1
    assert keeper.nbytes >= 4 << 20
    run.close()
    off = Run(tmp_path / "off", model=model, watch=False, snapshot_every=None)
    assert off.snapshots is None
    off.close()
    fixed = Run(tmp_path / "fixed", model=model, watch=False, snapshot_every=3)
    assert fixed.snapshots is not None and fixed.snapshots.every == 3
    for _ in range(7):
        fixed.step()
    assert fixed.snapshots.held_step == 6
    fixed.close()
    ckpt = Checkpointer(tmp_path / "x")
    with pytest.raises(ValueError, match="snapshot_every"):
        SnapshotKeeper(ckpt, 0)
    ckpt.close()


def test_persist_snapshot_commits_despite_an_earlier_failed_save_and_skips_stale_ones(tmp_path: Path) -> None:
    model, opt = small_model()
    ckpt = Checkpointer(tmp_path)
    keeper = SnapshotKeeper(ckpt, 1)
    state = {"model": model, "optimizer": opt}
    keeper.after_step(7, lambda: state, epoch=1, metadata=dict, saving=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt)  # the live state moves on; the snapshot must not
    ckpt._error = OSError(28, "No space left on device")  # a periodic save that failed earlier
    keeper._step_times.clear()  # no step time known: the step cannot be counted on, persist at once
    now = datetime.now(timezone.utc)
    keeper._on_notice(Notice("test", "terminate", now + timedelta(seconds=30), now))
    assert keeper.persisted is not None and keeper.persisted[0] == 7
    info = ckpt.latest(verify=True)
    assert info is not None and (info.step, info.epoch, info.metadata.get("snapshot")) == (7, 1, True)
    saved = ckpt.load(info)["model"]
    for k, v in expected.items():
        assert torch.equal(saved[k], v), f"{k}"
    # a regular save of a newer step started since: the held snapshot is stale, nothing is written
    keeper.saved(9)
    keeper.persisted = None
    keeper._on_notice(Notice("test", "terminate", now + timedelta(seconds=30), now))
    assert keeper.persisted is None
    assert [i.step for i in ckpt.list()] == [7]
    keeper.close()
    ckpt.close()
