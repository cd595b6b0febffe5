"""In-memory snapshots: a notice shorter than a step still leaves a durable checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from torch import nn

from spotsafe import Run
from spotsafe.checkpoint.snapshots import SnapshotKeeper
from spotsafe.checkpoint.staging import StagingBuffer, stage
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.cloud.notice import Notice
from spotsafe.distributed.board import NoticeBoard
from spotsafe.errors import DistributedError
from tests.helpers import quiet_watcher, wait_until

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


@pytest.mark.slow
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
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    durable = next(e for e in recorded if e["event"] == "snapshot_durable")
    # The newest snapshot: step 5, or under load (a copy above 2% of a step) the last multiple of `every`.
    held = durable["step"]
    assert 5 - durable["every"] < held <= 5, f"{durable}"
    assert (newest.step, newest.reason, newest.metadata.get("snapshot")) == (held, "notice", True)
    ckpt.close()
    assert durable["seconds"] < grace

    # The replacement (another init) resumes at most one snapshot behind and ends bit-identical.
    proc = child(tmp_path, tmp_path / "store", tmp_path / "b.pt", 99, SPOTSAFE_EVENTS=str(events))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{err}"
    resumed = [json.loads(line) for line in events.read_text().splitlines() if '"resumed"' in line]
    assert resumed[-1]["step"] == held
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "b.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}"


DDP_WORKER = Path(__file__).parent / "dist_workers" / "snapshot_ddp.py"


def torchrun_job(out: Path, store: Path, **env: str) -> subprocess.Popen[str]:
    """tests/dist_workers/snapshot_ddp.py under a 2-rank torchrun (gloo, CPU), in its own session."""
    out.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, "OMP_NUM_THREADS": "1", "SPOTSAFE_SOURCES": "signal", **env}
    full.pop("SPOTSAFE_STORE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with open(out / "torchrun.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*cmd, str(DDP_WORKER), str(out), str(store)],
            env=full,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )


def kill_job(job: subprocess.Popen[str], out: Path) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own: killpg misses them).

    A worker is killed only while it is still torchrun's child, so a recycled pid is never hit.
    """
    if job.poll() is not None:
        return
    for pid_file in out.glob("pid-r*"):
        try:
            pid = int(pid_file.read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == job.pid:  # its parent is this torchrun
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass  # gone already
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(60)


def finished(job: subprocess.Popen[str], out: Path, timeout: float = 180) -> None:
    try:
        code = job.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_job(job, out)
        code = None
    log = (out / "torchrun.log").read_text(errors="replace")
    assert code == 0, f"torchrun exited {code}:\n{log[-6000:]}"


@pytest.mark.slow
def test_two_ranks_notice_on_one_persist_the_same_snapshot_before_the_kill(tmp_path: Path) -> None:
    # Steps of 0.5 s (from step 6: 10 s, longer than the deadline), agreement every step. SIGTERM to rank 1 alone
    # early in step 6 with 2 s of grace, every process SIGKILLed at the deadline: no step() is reached again.
    grace = 2.0
    cut, store, ref_out = tmp_path / "cut", tmp_path / "store", tmp_path / "ref"
    job = torchrun_job(cut, store, STEP_SECONDS="0.5", LATE_STEP_SECONDS="10", SPOTSAFE_SIGNAL_GRACE=str(grace))
    ref: subprocess.Popen[str] | None = None
    try:

        def running(out: Path) -> bool:
            if job.poll() is not None:
                raise AssertionError((cut / "torchrun.log").read_text(errors="replace")[-6000:])
            return all((out / f"pid-r{r}").exists() for r in (0, 1))

        # The uninterrupted reference, at full speed, beside the interrupted run; started once the first job's
        # workers are up, so the two torchrun launches never pick their rendezvous ports at the same moment.
        wait_until(lambda: running(cut), 180, interval=0.05, what="the interrupted job's workers")
        ref = torchrun_job(ref_out, tmp_path / "ref-store")
        _two_ranks_notice_on_one(tmp_path, job, ref, grace)
    finally:
        kill_job(job, cut)
        if ref is not None:
            kill_job(ref, ref_out)


def _two_ranks_notice_on_one(
    tmp_path: Path, job: subprocess.Popen[str], ref: subprocess.Popen[str], grace: float
) -> None:
    cut, store = tmp_path / "cut", tmp_path / "store"
    try:

        def both_at_step_5() -> bool:
            if job.poll() is not None:
                raise AssertionError((cut / "torchrun.log").read_text(errors="replace")[-6000:])
            steps = [cut / f"step-r{r}" for r in (0, 1)]
            return all(p.exists() and p.read_text() == "5" for p in steps)

        wait_until(both_at_step_5, 180, interval=0.01, what="both ranks done with step 5")
        pids = [int((cut / f"pid-r{r}").read_text()) for r in (0, 1)]
        time.sleep(0.2)
        os.kill(pids[1], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        kill_job(job, cut)
    log = (cut / "torchrun.log").read_text(errors="replace")
    # Both ranks were still inside step 6 at the deadline (else this proves nothing about the snapshot path).
    assert [(cut / f"step-r{r}").read_text() for r in (0, 1)] == ["5", "5"], f"{log[-6000:]}"

    durable = []
    for rank in (0, 1):
        events = [json.loads(line) for line in (cut / f"events-r{rank}.jsonl").read_text().splitlines()]
        durable += [e for e in events if e["event"] == "snapshot_durable"]
    assert len(durable) == 2, f"{durable}\n{log[-6000:]}"
    # The same step on both ranks: 5, or under load (a copy above 2% of a step) the last multiple of `every`.
    held = durable[0]["step"]
    assert [(e["step"], e["every"], e["source_rank"]) for e in durable] == [(held, durable[0]["every"], 1)] * 2
    assert 5 - durable[0]["every"] < held <= 5, f"{durable}"
    assert all(e["since_notice"] < grace for e in durable), f"{durable}"  # durable on both before the deadline
    ckpt = Checkpointer(store)
    newest = ckpt.latest(verify=True)
    assert newest is not None, f"{log[-6000:]}"
    assert (newest.step, newest.reason, newest.metadata.get("snapshot")) == (held, "notice", True)
    manifest = json.loads((store / newest.name / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted({f["rank"] for f in manifest["files"]}) == [0, 1]
    ckpt.close()

    # The relaunch (after the reference ended: one torchrun launch at a time picks its ports) resumes at that
    # step on both ranks and ends bit-identical to the uninterrupted run.
    finished(ref, tmp_path / "ref")
    again = tmp_path / "again"
    relaunch = torchrun_job(again, store)
    try:
        finished(relaunch, again)
    finally:
        kill_job(relaunch, again)
    for rank in (0, 1):
        events = [json.loads(line) for line in (again / f"events-r{rank}.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events if e["event"] == "resumed"] == [held]
    a = torch.load(tmp_path / "ref" / "weights.pt", weights_only=True)
    b = torch.load(again / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}"


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
    # about 1 + 40 / every snapshots: one or two here, a few where load stretches the 1 ms steps
    # (every falls with the step time); never one per step
    assert 1 <= keeper.taken < 20, f"{keeper.taken} snapshots in 40 steps (every {keeper.every})"
    assert keeper.stall_total_s >= keeper.first_stall_s > 0
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


def test_the_deadline_path_leaves_pruning_to_the_next_save(tmp_path: Path) -> None:
    """On a notice the snapshot is durable at its commit: no old checkpoint is deleted in the
    seconds the deadline leaves (they go to the commit and any upload); the next save prunes."""
    model, opt = small_model()
    ckpt = Checkpointer(tmp_path, keep_last=1)
    keeper = SnapshotKeeper(ckpt, 1)
    state = {"model": model, "optimizer": opt}
    ckpt.save(3, state, async_=False)
    keeper.saved(3)
    keeper.after_step(5, lambda: state, epoch=0, metadata=dict, saving=False)
    keeper._step_times.clear()  # no step time known: persist at once
    now = datetime.now(timezone.utc)
    keeper._on_notice(Notice("test", "terminate", now + timedelta(seconds=30), now))
    assert keeper.persisted is not None, "the snapshot was not persisted"
    steps = [i.step for i in ckpt.list()]
    assert steps == [3, 5], f"after the notice's persist: {steps}"
    ckpt.save(6, state, async_=False)
    ckpt.wait()  # a sync save prunes in the background
    steps = [i.step for i in ckpt.list()]
    assert steps == [6], f"the next save kept {steps} with keep_last=1"
    keeper.close()
    ckpt.close()


def two_rank_checkpointers(root: Path) -> tuple[list[Checkpointer], list[NoticeBoard]]:
    """Rank 0's and rank 1's Checkpointer over one store and one board, in this process (no process group:
    persist_snapshot_ranks takes no collective, only the board)."""
    from torch.distributed import HashStore

    from spotsafe.distributed.context import DistContext

    shared = HashStore()
    ckpts, boards = [], []
    for rank in (0, 1):
        ctx = DistContext(rank=rank, world_size=2, local_rank=rank, backend="gloo", group=None, agreement_group=None)
        ckpts.append(Checkpointer(root, dist=ctx, per_rank=("rng",)))
        boards.append(NoticeBoard(shared, "spotsafe/board/test", rank, 2))
    # What Checkpointer.acquire() does collectively: rank 0 takes the lease, every rank learns its generation.
    generation = ckpts[0]._acquire()
    for c in ckpts:
        c.generation = generation
    return ckpts, boards


def test_ranks_commit_a_snapshot_through_the_board_and_never_a_half_one(tmp_path: Path) -> None:
    model, opt = small_model()
    ckpts, boards = two_rank_checkpointers(tmp_path)
    now = datetime.now(timezone.utc)
    buffers = [StagingBuffer(), StagingBuffer()]
    snaps = [
        stage({"model": model, "optimizer": opt, "rng": torch.arange(3)}, buffers[0]),
        stage({"rng": torch.arange(5)}, buffers[1]),
    ]
    errors: list[BaseException] = []

    def persist(rank: int, step: int, timeout: float) -> None:
        try:
            ckpts[rank].persist_snapshot_ranks(
                step, snaps[rank], boards[rank], epoch=0, reason="notice", when=now, metadata={}, timeout=timeout
            )
        except BaseException as e:  # checked by the test
            errors.append(e)

    threads = [threading.Thread(target=persist, args=(rank, 3, 30.0)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    info = ckpts[0].latest(verify=True)
    assert info is not None and info.step == 3
    manifest = json.loads((tmp_path / info.name / "manifest.json").read_text())
    assert (manifest["world_size"], sorted({f["rank"] for f in manifest["files"]})) == (2, [0, 1])
    loaded = Checkpointer(tmp_path).load(info)  # one process reads rank 0's part
    assert torch.equal(loaded["model"]["0.weight"], model.state_dict()["0.weight"])

    # Rank 1 never posts its files (it died): rank 0 gives up at its timeout and commits nothing.
    with pytest.raises(DistributedError, match="not posted"):
        ckpts[0].persist_snapshot_ranks(
            4, snaps[0], boards[0], epoch=0, reason="notice", when=now, metadata={}, timeout=0.5
        )
    assert not list(tmp_path.glob("step-000000000004*/manifest.json"))
    # Rank 1's write fails: it says so on the board, rank 0 commits nothing and names it.
    boards[1].post("snapshot-000000000005/files/1", {"error": "OSError: [Errno 28] No space left on device"})
    with pytest.raises(DistributedError, match="rank 1: OSError"):
        ckpts[0].persist_snapshot_ranks(
            5, snaps[0], boards[0], epoch=0, reason="notice", when=now, metadata={}, timeout=5
        )
    assert not list(tmp_path.glob("step-000000000005*/manifest.json"))
    assert [i.step for i in ckpts[0].list()] == [3]
    for c in ckpts:
        c.close()


def test_under_several_ranks_the_keeper_snapshots_agreed_steps_and_keeps_two(tmp_path: Path) -> None:
    from torch.distributed import HashStore

    model, opt = small_model()
    ckpt = Checkpointer(tmp_path)
    board = NoticeBoard(HashStore(), "spotsafe/board/x", 0, 1)
    keeper = SnapshotKeeper(ckpt, "auto", board=board)
    state = {"model": model, "optimizer": opt}
    for step in range(1, 4):
        keeper.after_step(step, lambda: state, epoch=0, metadata=dict, saving=False)
    assert keeper.held_steps == [2, 3]  # the newest two: a peer may still be one step behind
    keeper.agree(3)  # the value the agreement's reduce handed every rank after the same call
    for step in range(4, 10):
        keeper.after_step(step, lambda: state, epoch=0, metadata=dict, saving=step == 9)
    assert keeper.held_steps == [3, 6]  # step % 3 == 0 on every rank; 9 was a regular save
    if not torch.cuda.is_available():  # the CPU path: plain copies, no side stream, nothing pending
        assert keeper._streams is None
        assert keeper._held is not None and keeper._held.snap.pending == []
    keeper.close()
    ckpt.close()
    assert board.read("nothing") is None
    board.post("k/0", {"a": 1})
    assert board.gather("g", [1, 2], timeout=1) == [[1, 2]]
    with pytest.raises(DistributedError, match="not posted"):
        board.wait(["missing"], timeout=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_snapshot_copies_on_a_side_stream_and_equals_the_device_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).cuda()
    opt = torch.optim.Adam(model.parameters())

    def gpu_step() -> None:
        loss = model(torch.randn(256, 1024, device="cuda")).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    gpu_step()
    expected_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    expected_avg = {i: s["exp_avg"].cpu().clone() for i, s in enumerate(opt.state.values())}
    ckpt = Checkpointer(tmp_path)
    keeper = SnapshotKeeper(ckpt, 1)
    keeper.after_step(1, lambda: {"model": model, "optimizer": opt}, epoch=0, metadata=dict, saving=False)
    held = keeper._held
    assert held is not None and held.snap.pending, "the copies were not issued on a side stream"
    for _ in range(5):  # queued at once: the compute stream must wait for the copies before changing a weight
        gpu_step()
    keeper._step_times.clear()  # no step time known: persist at once
    now = datetime.now(timezone.utc)
    keeper._on_notice(Notice("test", "terminate", now + timedelta(seconds=30), now))
    assert keeper.persisted is not None and keeper.persisted[0] == 1
    assert held.snap.ready and held.snap.device_seconds() is not None
    saved = ckpt.load(ckpt.latest(verify=True))  # type: ignore[arg-type]
    for k, v in expected_model.items():
        assert torch.equal(saved["model"][k].cpu(), v), f"{k}"
    avgs = [s["exp_avg"] for s in saved["optimizer"]["state"].values()]
    for i, v in expected_avg.items():
        assert torch.equal(avgs[i].cpu(), v), f"exp_avg {i}"
    assert not torch.equal(model.state_dict()["0.weight"].cpu(), expected_model["0.weight"])  # the live state moved
    keeper.close()
    ckpt.close()


def test_the_agreement_carries_the_snapshot_cadence_wish_in_its_reduce() -> None:
    import torch.distributed as dist
    from torch.distributed import HashStore

    from spotsafe.distributed.agreement import NoticeAgreement
    from spotsafe.distributed.context import DistContext

    # One rank in this process (the MAX over several ranks runs in the 2-rank test above).
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        ctx = DistContext(rank=0, world_size=1, local_rank=0, backend="gloo", group=None, agreement_group=None)
        agreement = NoticeAgreement(ctx, every=1, async_=False)
        assert agreement.snapshot_every == 0
        agreement.step(None, 1, snapshot_every=7)
        assert agreement.snapshot_every == 7
        agreement.step(None, 2, snapshot_every=0)  # no wish this time: the agreed cadence stays
        assert agreement.snapshot_every == 7
    finally:
        dist.destroy_process_group()
