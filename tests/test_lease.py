"""Many instances, one store: the writer lease, fencing, provably-dead cleanup, checked commits.

Writers that overlap are real processes here (a subprocess against the test process),
on a local directory, on S3 (moto's server), on a mirror of both, on GCS (fake-gcs-server)
and on Azure Blob (azurite).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import spotsafe
from spotsafe.checkpoint.files import commit_manifest
from spotsafe.checkpoint.lease import GENERATION_KEY, LEASE_DIR, Lease, LeaseRecord, generations, read_record
from spotsafe.checkpoint.manifest import MANIFEST, Manifest, checkpoint_name
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.errors import CheckpointNotFound, LeaseTimeout, StoreError, WriterFenced
from spotsafe.storage.base import Buffer, Store
from spotsafe.storage.local import LocalStore
from spotsafe.storage.mirror import MirrorStore
from spotsafe.storage.registry import open_store
from tests.helpers import stop_child, wait_until

#: A subprocess writer: saves ``steps`` synchronously; pauses (announced by a file) in the
#: middle of the save of ``pause_step``, after its data file is written and before the commit.
WRITER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.errors import WriterFenced
    from spotsafe.storage.registry import open_store

    cfg = json.loads(sys.argv[1])
    marks = Path(cfg["marks"])
    store = open_store(cfg.get("store"), local=cfg.get("local"), remote=cfg.get("remote"),
                       storage_options=cfg.get("options"))
    inner = store.write_file
    def write_file(path, buffers):
        inner(path, buffers)
        if path.endswith(".bin") and path.startswith("step-%012d-g" % cfg.get("pause_step", -1)):
            (marks / "writing").write_text(path)
            time.sleep(cfg.get("pause", 2.0))
    store.write_file = write_file
    if cfg.get("run"):  # a spotsafe.Run: steps, then a manual save of run_steps (paused mid-write)
        import spotsafe
        torch.manual_seed(0)
        run = spotsafe.Run(store, model=torch.nn.Linear(3, 2), watch=False, every_steps=10_000, async_=False)
        for _ in range(cfg["run_steps"]):
            run.step()
        run.save()
        run.close()
        sys.exit(0)
    ckpt = Checkpointer(store, async_=False, keep_last=10)
    try:
        for step in cfg["steps"]:
            ckpt.save(step, {"w": torch.full((1000,), float(step))}, reason="notice")
            (marks / ("saved-%d" % step)).write_text("")
        ckpt.close()
    except WriterFenced as e:
        print("FENCED:", e, file=sys.stderr)
        sys.exit(77)
""")


@pytest.fixture
def lease_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SPOTSAFE_LEASE_SECONDS", "2")
    yield


StoreSpec = dict[str, Any]


@pytest.fixture(params=["local", "s3", "mirror", "gcs", "azure"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    """How to open the shared store, as JSON a subprocess can take too (GCS, Azure: through their environment)."""
    if request.param == "local":
        return {"store": str(tmp_path / "store")}
    if request.param == "gcs":
        return {"store": f"gs://{request.getfixturevalue('gcs_bucket')}/runs/r"}
    if request.param == "azure":
        return {"store": f"az://{request.getfixturevalue('az_container')}/runs/r"}
    bucket = request.getfixturevalue("s3_bucket")
    options = request.getfixturevalue("s3_options")
    if request.param == "s3":
        return {"store": f"s3://{bucket}/runs/r", "options": options}
    return {"local": str(tmp_path / "ebs"), "remote": f"s3://{bucket}/runs/r", "options": options}


def opened(spec: StoreSpec) -> Store:
    return open_store(
        spec.get("store"), local=spec.get("local"), remote=spec.get("remote"), storage_options=spec.get("options")
    )


def start_writer(tmp_path: Path, spec: StoreSpec, **cfg: Any) -> subprocess.Popen[str]:
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps({**spec, **cfg, "marks": str(marks)})],
        text=True,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )


def wait_for(
    what: str, cond: Callable[[], bool], proc: subprocess.Popen[str] | None = None, timeout: float = 60
) -> None:
    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the writer exited ({proc.returncode}) before {what}: {proc.communicate()[1]}")
        return cond()

    wait_until(ready, timeout, what=what)


def weights(ckpt: Checkpointer, step: int) -> float:
    return float(ckpt.load(step)["w"][0])


# ----------------------------------------------------------------------------- the lease itself


def test_generations_increase_and_a_release_hands_over_at_once(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        with Checkpointer(tmp_path, async_=False) as c:
            c.save(n, {"w": torch.zeros(3)})
            assert c.lease is not None and c.lease.generation == n
            assert c.last_saved is not None and c.last_saved.generation == n
    store = LocalStore(tmp_path)
    assert generations(store) == [1, 2, 3]
    records = [read_record(store, g) for g in (1, 2, 3)]
    assert [r.released for r in records if r] == [True, True, True]
    # Each generation recorded the newest step it saw when it took over (the ghost rule's input).
    assert [r.base_step for r in records if r] == [-1, 1, 2]
    manifest = json.loads((tmp_path / checkpoint_name(3, 3) / MANIFEST).read_text())
    assert manifest["metadata"] == {GENERATION_KEY: 3} and manifest["format_version"] == 1
    with Checkpointer(tmp_path) as c:
        assert [(i.step, i.generation, i.metadata) for i in c.list()] == [(1, 1, {}), (2, 2, {}), (3, 3, {})]
    with pytest.raises(ValueError, match="reserved"):
        Checkpointer(tmp_path).save(9, {"w": torch.zeros(1)}, metadata={GENERATION_KEY: 1})


def test_readers_never_take_the_lease(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Checkpointer(tmp_path, async_=False) as c:
        c.save(1, {"w": torch.zeros(3)})
    before = sorted((tmp_path / LEASE_DIR).iterdir())
    snapshot = [p.read_bytes() for p in before]
    from spotsafe.cli.main import main

    assert main(["ls", str(tmp_path)]) == 0
    assert main(["verify", str(tmp_path)]) == 0
    with Checkpointer(tmp_path) as reader:
        assert reader.latest(verify=True) is not None
        reader.load()
        assert reader.lease is None
    after = sorted((tmp_path / LEASE_DIR).iterdir())
    assert after == before and [p.read_bytes() for p in after] == snapshot


def test_a_superseded_writer_in_this_process_cannot_commit_or_prune(tmp_path: Path) -> None:
    old = Checkpointer(tmp_path, async_=False, keep_last=1)
    old.save(1, {"w": torch.full((4,), 1.0)})
    new = Checkpointer(tmp_path, async_=False, keep_last=1)
    new.save(2, {"w": torch.full((4,), 2.0)})  # the same process: takes over at once (logged)
    with pytest.raises(WriterFenced, match="superseded"):
        old.save(3, {"w": torch.full((4,), 3.0)})
    assert not (tmp_path / checkpoint_name(3, 1) / MANIFEST).exists()
    with pytest.raises(WriterFenced):
        old.mark_complete(3)
    new.wait()
    assert [i.step for i in new.list()] == [2]  # keep_last=1: new pruned 1; old pruned nothing of new's
    old.close()  # a fenced writer's close writes nothing to the lease
    assert read_record(LocalStore(tmp_path), 2) is not None
    assert read_record(LocalStore(tmp_path), 2).released is False  # type: ignore[union-attr]
    new.close()


def test_the_ghost_rule_hides_and_removes_a_commit_that_slipped_past_a_takeover(tmp_path: Path) -> None:
    old = Checkpointer(tmp_path, async_=False, keep_last=5)
    old.save(10, {"w": torch.full((4,), 10.0)})
    old.wait()  # its retention, in the background: over before its (simulated) next commit, as in a real writer
    new = Checkpointer(tmp_path, async_=False, keep_last=5)
    new.save(11, {"w": torch.full((4,), 11.0)})  # took over having seen step 10
    new.wait()  # its retention too (it removes an older generation's directories without a manifest)
    # The race the check cannot close alone: the old writer checked its lease just before the
    # takeover and its manifest (step 50, generation 1) landed just after it.
    m = old.catalog.manifest(checkpoint_name(10, 1))
    store = LocalStore(tmp_path)
    for f in m.files:
        (tmp_path / checkpoint_name(50, 1)).mkdir(exist_ok=True)
        (tmp_path / checkpoint_name(50, 1) / f.path).write_bytes(
            (tmp_path / checkpoint_name(10, 1) / f.path).read_bytes()
        )
    commit_manifest(store, checkpoint_name(50, 1), Manifest(**{**m.__dict__, "step": 50}))
    with Checkpointer(tmp_path) as reader:
        assert [i.step for i in reader.list()] == [10, 11]
        latest = reader.latest(verify=True)
        assert latest is not None and latest.step == 11
    new.save(12, {"w": torch.full((4,), 12.0)})  # the holder removes the ghost
    new.wait()  # retention after a sync save runs in the background
    assert not (tmp_path / checkpoint_name(50, 1)).exists()
    assert [i.step for i in new.list()] == [10, 11, 12]
    new.close()
    old._closed = True  # superseded: nothing to release
    old.store.close()


def test_lease_seconds_setting() -> None:
    from spotsafe.settings import Settings

    assert Settings.from_env({}).lease_seconds == 60.0
    assert Settings.from_env({"SPOTSAFE_LEASE_SECONDS": "5"}).lease_seconds == 5.0
    with pytest.raises(ValueError, match="SPOTSAFE_LEASE_SECONDS"):
        Settings.from_env({"SPOTSAFE_LEASE_SECONDS": "soon"})
    assert spotsafe.EXIT_FENCED == 77 and spotsafe.WriterFenced is WriterFenced
    assert issubclass(WriterFenced, PermissionError)


# ----------------------------------------------------------------------------- checked commits


class LosingStore(LocalStore):
    """A disk that loses (or truncates) a data file right after writing it."""

    def __init__(self, path: Path, how: str) -> None:
        super().__init__(path)
        self.how = how

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        super().write_file(path, buffers)
        if path.endswith(".bin"):
            full = self.root / path
            if self.how == "lose":
                full.unlink()
            else:
                with open(full, "r+b") as f:
                    f.truncate(10)


@pytest.mark.parametrize("how", ["lose", "truncate"])
def test_the_commit_checks_every_file_before_it_speaks(tmp_path: Path, how: str) -> None:
    with Checkpointer(LosingStore(tmp_path, how), async_=False) as c:
        with pytest.raises(StoreError, match=r"not committing .*step-000000000007.*(missing|bytes)"):
            c.save(7, {"w": torch.zeros(1000)})
        assert not (tmp_path / checkpoint_name(7, 1) / MANIFEST).exists()
        assert c.list() == []


# ----------------------------------------------------------------------------- overlapping processes


def test_a_save_waits_for_a_live_writer_instead_of_destroying_its_checkpoint(tmp_path: Path, spec: StoreSpec) -> None:
    """The issue's first scenario: B saves step 500 (slow disk) while A saves step 400."""
    b = start_writer(tmp_path, spec, steps=[500], pause_step=500, pause=2.0)
    wait_for("B to be mid-save", (tmp_path / "marks" / "writing").exists, b)
    with Checkpointer(opened(spec), async_=False) as a:
        a.save(400, {"w": torch.full((1000,), 400.0)})  # waits for B's lease: B is alive and renewing
        assert (tmp_path / "marks" / "saved-500").exists()  # only once B had committed and let go
        _, err = b.communicate(timeout=60)
        assert b.returncode == 0, f"{err}"
        assert [i.step for i in a.list()] == [400, 500]
        for step in (400, 500):
            a.check(a.catalog.resolve(step))  # every file there with its checksum
            assert weights(a, step) == step
        assert a.lease is not None and a.lease.generation == 2
        a.store.flush(timeout=60)


def test_a_run_constructed_while_another_process_is_mid_save_waits_and_resumes_from_it(tmp_path: Path) -> None:
    from spotsafe import Run

    spec = {"store": str(tmp_path / "store")}
    writer = start_writer(tmp_path, spec, run=True, run_steps=5, pause_step=5, pause=2.0)
    wait_for("the writer's Run to be mid-save", (tmp_path / "marks" / "writing").exists, writer)
    model = torch.nn.Linear(3, 2)
    run = Run(tmp_path / "store", model=model, watch=False)  # waits for the writer to commit and let go
    try:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, f"{err}"
        assert run.step_count == 5 and run.resumed_from is not None and run.resumed_from.step == 5
        assert run.checkpointer.lease is not None and run.checkpointer.lease.generation == 2
        run.checkpointer.check(run.resumed_from)  # the writer's checkpoint is whole
    finally:
        run.close()


def test_a_frozen_writer_superseded_then_woken_raises_and_leaves_the_new_writers_checkpoints(
    tmp_path: Path, spec: StoreSpec, lease_env: None
) -> None:
    old = start_writer(tmp_path, spec, steps=[1, 100], pause_step=100, pause=1.0)
    wait_for("the old writer to be mid-save", (tmp_path / "marks" / "writing").exists, old)
    os.kill(old.pid, signal.SIGSTOP)  # a stopped or partitioned instance: no renewals any more
    try:
        stopped = time.monotonic()
        with Checkpointer(opened(spec), async_=False, keep_last=10) as new:
            t0 = time.monotonic()
            new.save(2, {"w": torch.full((1000,), 2.0)})  # waits out the 2 s lease of the silent holder
            assert_silent_for_a_lease_period(new, stopped=stopped, looked=t0)
            new.save(3, {"w": torch.full((1000,), 3.0)})
            os.kill(old.pid, signal.SIGCONT)
            _, err = old.communicate(timeout=60)
            assert old.returncode == 77 and "FENCED" in err and "superseded" in err, f"{err}"
            assert [i.step for i in new.list()] == [1, 2, 3]
            assert new.store.file_size(f"{checkpoint_name(100, 1)}/{MANIFEST}") is None
            for step in (1, 2, 3):
                new.check(new.catalog.resolve(step))
                assert weights(new, step) == step
            new.save(4, {"w": torch.full((1000,), 4.0)})  # still the holder
            assert new.store.flush(timeout=60)
    finally:
        if old.poll() is None:
            os.kill(old.pid, signal.SIGCONT)
        stop_child(old)
    if "remote" in spec:  # the remote tier holds the new writer's history too, never step 100
        with Checkpointer(spec["remote"], storage_options=spec["options"]) as remote:
            assert [i.step for i in remote.list()] == [1, 2, 3, 4]


def read_whole_record(store: Store, generation: int) -> LeaseRecord | None:
    """The record of a generation whose holder renews it meanwhile: a read that raced a renewal is read again."""
    for _ in range(50):
        try:
            return read_record(store, generation)
        except StoreError:  # S3: the object was replaced between the HEAD and the GET (PreconditionFailed)
            time.sleep(0.05)
    return read_record(store, generation)


def assert_silent_for_a_lease_period(new: Checkpointer, *, stopped: float, looked: float) -> None:
    """The takeover came a lease period after the stopped holder's last renewal, and says why.

    Measured on the records (one machine, one wall clock), not only from the new writer's first
    look: the holder may have gone silent well before that (a loaded machine took 3.4 s to open
    the store), and then the wall-clock rule rightly takes over well within 1.5 s of that look.
    A failure names the rule that allowed the takeover and the timings.
    """
    now = time.monotonic()
    assert new.lease is not None and new.lease.generation == 2
    why = new.lease.takeover or ""
    holder = read_record(new.lease.tiers[0], 1)
    taken = read_whole_record(new.lease.tiers[0], 2)
    assert holder is not None and taken is not None
    silent = (taken.acquired - holder.renewed).total_seconds()
    report = (
        f"generation 2 taken {silent:.2f} s after generation 1 last renewed (lease {holder.lease_seconds:g} s; "
        f"{now - stopped:.2f} s after the holder was stopped, {now - looked:.2f} s after the first look; "
        f"{holder.renewals} renewals), because: {why}"
    )
    assert holder.released is False, f"{report}"
    assert silent >= holder.lease_seconds, f"{report}"  # whichever rule: never a holder that renewed within a period
    if "unchanged for" in why:  # silence on the taker's clock: it waited out the lease since its first look
        assert now - looked >= 1.5, f"{report}"
    else:  # or the record was stale by more than a period on the wall clock before the first look ended
        assert "stale on the wall clock" in why, f"{report}"
        assert silent > 2 * holder.lease_seconds, f"{report}"


def test_kill_9_at_random_instants_of_a_takeover_leaves_the_store_usable(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    store = tmp_path / "store"
    spec = {"store": str(store)}
    for k in range(5):
        victim = start_writer(tmp_path, spec, steps=[10 * k + 1, 10 * k + 2])
        time.sleep(rng.uniform(0.0, 1.2))  # anywhere: starting, taking over, writing, committing
        victim.kill()
        victim.communicate()
    t0 = time.monotonic()
    with Checkpointer(store, async_=False) as c:
        c.save(1000, {"w": torch.full((1000,), 1000.0)})  # the dead holder is seen dead at once
        assert time.monotonic() - t0 < 30, f"seed {seed}"
        latest = c.latest(verify=True)
        assert latest is not None and latest.step == 1000, f"seed {seed}"
        for info in c.list():
            c.check(info)  # every listed checkpoint is whole
    assert not any(p.name.startswith(".") for p in store.rglob("*")), f"seed {seed}: temp files left"


def test_mirror_resave_reaches_the_remote_as_its_last_version(tmp_path: Path) -> None:
    class SlowRemote(LocalStore):
        def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
            time.sleep(0.5)
            super().write_file(path, buffers)

    with Checkpointer(MirrorStore(LocalStore(tmp_path / "ebs"), SlowRemote(tmp_path / "remote")), async_=False) as c:
        c.save(5, {"w": torch.full((1000,), 1.0)}, reason="periodic")
        mirror = c.store
        assert isinstance(mirror, MirrorStore)
        wait_for("the first upload to be in flight", lambda: mirror._busy is not None and mirror._busy.kind == "upload")
        c.save(5, {"w": torch.full((1000,), 2.0)}, reason="final")  # the same step, re-saved
        assert mirror.flush(timeout=60)
        local = (tmp_path / "ebs" / checkpoint_name(5, 1) / MANIFEST).read_bytes()
        assert (tmp_path / "remote" / checkpoint_name(5, 1) / MANIFEST).read_bytes() == local
    with Checkpointer(tmp_path / "remote") as remote:
        assert weights(remote, 5) == 2.0 and remote.list()[-1].reason == "final"

    # Start-up resync compares content: a step re-saved locally after its upload goes up again.
    with Checkpointer(tmp_path / "ebs", async_=False) as local_only:
        local_only.save(5, {"w": torch.full((1000,), 3.0)}, reason="notice")
    with Checkpointer(MirrorStore(LocalStore(tmp_path / "ebs"), LocalStore(tmp_path / "remote"))) as c:
        c.store.cleanup_incomplete()
        assert c.store.flush(timeout=60)
    with Checkpointer(tmp_path / "remote") as remote:
        assert weights(remote, 5) == 3.0 and remote.list()[-1].reason == "notice"


def test_lease_acquire_timeout_names_the_store(tmp_path: Path) -> None:
    holder = start_writer(tmp_path, {"store": str(tmp_path / "s")}, steps=[1], pause_step=1, pause=30.0)
    try:
        wait_for("the holder to be mid-save", (tmp_path / "marks" / "writing").exists, holder)
        lease = Lease(LocalStore(tmp_path / "s"), seconds=60)
        with pytest.raises(spotsafe.LeaseTimeout, match=str(tmp_path / "s")):
            lease.acquire(timeout=0.5)
    finally:
        stop_child(holder)


#: A live writer in another process: takes the lease of a local store and renews it until stopped.
HOLDER = textwrap.dedent("""
    import sys, time
    from spotsafe.checkpoint.lease import Lease
    from spotsafe.storage.local import LocalStore
    lease = Lease(LocalStore(sys.argv[1]), seconds=float(sys.argv[2]))
    lease.acquire()
    print("held", flush=True)
    time.sleep(600)
""")


class FlakyLeaseReads(LocalStore):
    """A disk (NFS, say) whose reads of lease records now and then fail with EIO or come back cut short."""

    def __init__(self, path: Path, how: str) -> None:
        super().__init__(path)
        self.how = how
        self.reads = 0
        self.failed = 0

    def read_file(self, path: str) -> memoryview:
        data = super().read_file(path)
        if path.startswith(f"{LEASE_DIR}/"):
            self.reads += 1
            if self.reads <= 4 or self.reads % 3 == 0:
                self.failed += 1
                if self.how == "error":
                    raise StoreError(errno.EIO, f"{self.url}/{path}: read failed: Input/output error (injected)")
                return memoryview(bytes(data)[: len(data) // 2])  # torn: a record cut mid-write
        return data


@pytest.mark.parametrize("how", ["error", "torn"])
def test_a_failed_read_of_a_live_holders_lease_is_never_taken_for_expiry(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    period = 3.0
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(root), str(period)], text=True, stdout=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        flaky = FlakyLeaseReads(root, how)
        lease = Lease(flaky, seconds=period, poll=0.1)
        # The holder is alive and renews every second: its failed reads are no expiry.
        with caplog.at_level(logging.WARNING, logger="spotsafe.checkpoint.lease"), pytest.raises(LeaseTimeout):
            lease.acquire(timeout=period)
        assert flaky.failed >= 4, f"{lease.takeover}"
        assert generations(LocalStore(root)) == [1], f"{lease.takeover}"
        holder_record = read_record(LocalStore(root), 1)
        assert holder_record is not None and holder_record.renewals >= 1  # it did renew meanwhile
        cause = "Input/output error (injected)" if how == "error" else "unreadable writer lease"
        problems = [r.getMessage() for r in caplog.records if cause in r.getMessage()]
        assert 1 <= len(problems) <= 2, f"{problems}"  # at most once per lease period
        assert flaky.url in problems[0], f"{problems}"
        assert "generation 1" in problems[0], f"{problems}"

        # The holder really stops renewing: taken over a lease period after its last renewal.
        os.kill(holder.pid, signal.SIGSTOP)
        assert lease.acquire(timeout=30) == 2
        assert lease.takeover is not None
        # silence seen by the taker, or (a machine stalled for a lease period after the SIGSTOP)
        # a record already stale on the wall clock at the first look: either rule, never sooner
        rules = ("unchanged for", "stale on the wall clock")
        assert any(rule in lease.takeover for rule in rules), f"{lease.takeover}"
        last = read_record(LocalStore(root), 1)
        taken = read_record(LocalStore(root), 2)
        assert last is not None and taken is not None and not last.released
        assert (taken.acquired - last.renewed).total_seconds() >= period, f"{lease.takeover}"
        lease.release()
    finally:
        stop_child(holder)


def test_a_listed_but_missing_record_is_waited_out_for_a_lease_period_then_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A generation whose record vanished (deleted by hand, copied by a sync without its file):
    no deadlock, and no takeover before a live holder would have rewritten it."""

    class Vanished(LocalStore):
        def read_file(self, path: str) -> memoryview:
            if path.startswith(f"{LEASE_DIR}/"):
                raise CheckpointNotFound(f"{self.url}/{path}: no such file (as a sync left it)")
            return super().read_file(path)

    first = Lease(LocalStore(tmp_path), seconds=60)
    first.acquire()
    first._stop.set()  # this object stops renewing and is never released
    lease = Lease(Vanished(tmp_path), seconds=1.0, poll=0.05)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="spotsafe.checkpoint.lease"):
        assert lease.acquire(timeout=30) == 2
    assert time.monotonic() - t0 >= 1.0
    assert lease.takeover is not None
    assert "missing" in lease.takeover, f"{lease.takeover}"
    assert "generation 1" in caplog.text and "listed but missing" in caplog.text
    lease.release()


def test_a_writer_is_fenced_by_any_newer_generation_not_only_the_next(tmp_path: Path) -> None:
    """A mirror whose tiers disagree about the top generation: the takeover skips g+1."""
    remote = tmp_path / "remote"
    old = Checkpointer(MirrorStore(LocalStore(tmp_path / "ebs-a"), LocalStore(remote)), async_=False)
    old.save(1, {"w": torch.full((4,), 1.0)})
    assert old.lease is not None and old.lease.generation == 1
    # The replacement's own volume carries a generation 2 (released) of an earlier history.
    for _ in (1, 2):
        stale = Lease(LocalStore(tmp_path / "ebs-b"))
        stale.acquire()
        stale.release()
    new = Lease(MirrorStore(LocalStore(tmp_path / "ebs-b"), LocalStore(remote)))
    assert new.acquire() == 3  # one above the top of either tier (this process: at once)
    assert generations(LocalStore(remote)) == [1, 3]  # no generation 2 where the old writer looks
    with pytest.raises(WriterFenced, match="superseded by generation 3"):
        old.lease.renew()
    with pytest.raises(WriterFenced):
        old.save(2, {"w": torch.full((4,), 2.0)})
    for tier in ("ebs-a", "remote"):
        assert not (tmp_path / tier / checkpoint_name(2, 1) / MANIFEST).exists()
    new.release()
    new.store.close()
    old._closed = True  # superseded: nothing to release
    old.store.close()


# ----------------------------------------------------------------------------- Run and the supervisor

#: A training script for ``python -m spotsafe.resume``: deterministic, saves every 7 steps.
TRAIN = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from torch import nn
    import spotsafe
    torch.manual_seed(0 if len(sys.argv) < 3 else int(sys.argv[2]))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(42)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    run = spotsafe.Run(model=model, optimizer=opt, every_steps=int(os.environ.get("EVERY", "7")))
    Path(sys.argv[1] + ".ready").write_text(str(os.getpid()))
    for epoch in run.epochs(int(os.environ.get("EPOCHS", "6"))):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
            hold = os.environ.get("HOLD_FILE")
            while hold and run.step_count >= int(os.environ["HOLD_AT"]) and os.path.exists(hold):
                notice = run.watcher.notice if run.watcher is not None else None
                if notice is not None and notice.is_final:
                    break  # the terminate notice: handled at the next step
                time.sleep(0.05)
            run.step()
    run.finish()
    torch.save(model.state_dict(), sys.argv[1])
""")


def supervise(tmp_path: Path, store: Path, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    cmd = [sys.executable, "-m", "spotsafe.resume", "--store", str(store), "--backoff", "0"]
    with open(log, "w") as f:
        return subprocess.Popen([*cmd, "--", sys.executable, str(script), str(out)], text=True, stderr=f, env=env)


def events_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_capacity_rebalance_overlap_through_the_supervisor_ends_bit_identical(tmp_path: Path) -> None:
    """The old instance gets a rebalance recommendation, its replacement starts and waits for the
    store, the old one gets the terminate notice, saves and lets go; the replacement resumes there."""
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    # Long enough (with STEP_SLEEP) for the overlap to happen mid-run; one thread: CI has two cores.
    epochs = {"EPOCHS": "12", "EVERY": "25", "OMP_NUM_THREADS": "1"}
    ref = supervise(
        tmp_path,
        tmp_path / "ref",
        tmp_path / "ref.pt",
        {**os.environ, **epochs, "SPOTSAFE_SOURCES": "none"},
        tmp_path / "r",
    )
    assert ref.wait(timeout=180) == 0, f"{(tmp_path / 'r').read_text()}"

    old_events, new_events = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    with AWSSimulator() as sim:
        old_env = {
            **os.environ,
            **epochs,
            "SPOTSAFE_EVENTS": str(old_events),
            "SPOTSAFE_SOURCES": "aws",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
            "STEP_SLEEP": "0.05",
            # However slow the machine, the old instance is still mid-run when the terminate notice
            # comes: it pauses at step 100 (alive, renewing its lease) until that notice appears.
            "HOLD_FILE": str(tmp_path / "hold"),
            "HOLD_AT": "100",
        }
        (tmp_path / "hold").write_text("")
        old = supervise(tmp_path, tmp_path / "store", tmp_path / "old.pt", old_env, tmp_path / "o")
        new: subprocess.Popen[str] | None = None
        try:
            wait_for("the old instance to train", Path(str(tmp_path / "old.pt") + ".ready").exists, old)
            sim.arm_rebalance()
            wait_for("the rebalance checkpoint", lambda: any(e["event"] == "rebalance" for e in events_of(old_events)))
            # The replacement boots while the old instance still trains: it waits for the store.
            new_env = {**os.environ, **epochs, "SPOTSAFE_EVENTS": str(new_events), "SPOTSAFE_SOURCES": "none"}
            new = supervise(tmp_path, tmp_path / "store", tmp_path / "new.pt", new_env, tmp_path / "n")
            wait_for("the replacement to wait", lambda: "is being written by" in (tmp_path / "n").read_text(), new)
            assert events_of(new_events) == []  # it has neither restored nor started
            sim.arm("terminate")
            assert old.wait(timeout=120) == spotsafe.EXIT_PREEMPTED, f"{(tmp_path / 'o').read_text()}"
            assert new.wait(timeout=180) == 0, f"{(tmp_path / 'n').read_text()}"
        finally:
            for proc in (old, new):
                if proc is not None:
                    stop_child(proc)
    durable = [e for e in events_of(old_events) if e["event"] == "durable"]
    resumed = [e for e in events_of(new_events) if e["event"] == "resumed"]
    assert len(durable) == 1 and len(resumed) == 1
    assert durable[0]["step"] < 12 * 16  # the overlap happened mid-run
    assert resumed[0]["step"] == durable[0]["step"]  # nothing anyone was told is durable was lost
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "new.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}"


def test_a_superseded_run_exits_77_and_the_supervisor_does_not_restart_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {
        **os.environ,
        "SPOTSAFE_SOURCES": "none",
        "STEP_SLEEP": "0.05",
        "EPOCHS": "50",
        "SPOTSAFE_LEASE_SECONDS": "2",
    }
    sup = supervise(tmp_path, store, tmp_path / "old.pt", env, tmp_path / "o")
    try:
        ready = Path(str(tmp_path / "old.pt") + ".ready")
        wait_for("the run to train", ready.exists, sup)
        child = int(ready.read_text())
        os.kill(child, signal.SIGSTOP)  # a stopped instance...
        with Checkpointer(store, async_=False, keep_last=10) as new:
            new.acquire()  # ...whose store is taken over once its lease ran out
            new.save(10_000, {"w": torch.ones(3)})
            os.kill(child, signal.SIGCONT)  # ...then comes back
            assert sup.wait(timeout=60) == spotsafe.EXIT_FENCED
            log = (tmp_path / "o").read_text()
            assert "superseded" in log and "not restarting" in log and "restart 1" not in log, f"{log}"
            latest = new.latest(verify=True)
            assert latest is not None and latest.step == 10_000
    finally:
        stop_child(sup)


def test_a_superseded_writer_whose_files_were_cleaned_up_stops_as_fenced_not_crashed(tmp_path: Path) -> None:
    """The successor removes the old writer's unfinished step; the old save then fails on its
    files first, and must still report WriterFenced (Run: exit 77, not a crash to restart)."""
    import threading

    gate = threading.Event()

    class Gated(LocalStore):
        def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
            if path.endswith(".json") and not (self.root / path).parent.exists():
                raise StoreError(2, f"{path}: its directory vanished")  # as an object store would fail
            super().write_file(path, buffers)
            if path.endswith(".bin"):
                gate.wait(60)

    old = Checkpointer(Gated(tmp_path), async_=True)
    old.save(1, {"w": torch.zeros(1000)})
    wait_for("the old save to be mid-write", lambda: any((tmp_path / checkpoint_name(1, 1)).glob("*.bin")))
    with Checkpointer(tmp_path, async_=False) as new:
        new.save(2, {"w": torch.ones(1000)})  # takes over; its cleanup removes the unfinished step 1
        assert not (tmp_path / checkpoint_name(1, 1)).exists()
        gate.set()
        with pytest.raises(WriterFenced) as caught:
            old.wait()
        assert isinstance(caught.value.__cause__, StoreError)
        assert [i.step for i in new.list()] == [2]
    old._closed = True  # superseded: nothing to release
    old.store.close()


# ----------------------------------------------------------------------------- a server that ignores If-None-Match


@pytest.fixture
def ignoring(s3_proxy: Any, s3_proxy_options: dict[str, Any]) -> dict[str, Any]:
    """storage_options for moto behind a proxy that strips If-None-Match: it answers 200 and overwrites."""
    s3_proxy.strip_headers = {"if-none-match"}
    return s3_proxy_options


def bucket_keys(s3_client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", ()))


def test_a_server_that_ignores_conditional_writes_is_refused_and_left_clean(
    ignoring: dict[str, Any], s3_bucket: str, s3_client: Any
) -> None:
    url = f"s3://{s3_bucket}/runs/r"
    with (
        pytest.raises(StoreError, match="ignores conditional writes") as raised,
        Checkpointer(url, storage_options=ignoring, async_=False) as c,
    ):
        c.acquire(timeout=10)
    message = str(raised.value)
    assert url in message, f"{message}"  # the URL, the cause, the opt-out
    assert "unsafe_no_conditional_writes" in message, f"{message}"
    assert bucket_keys(s3_client, s3_bucket) == []  # no probe object, no lease file


def test_the_opt_out_saves_on_such_a_server_and_warns(
    ignoring: dict[str, Any], s3_bucket: str, s3_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://{s3_bucket}/runs/r"
    options = {**ignoring, "unsafe_no_conditional_writes": True}
    with caplog.at_level(logging.WARNING), Checkpointer(url, storage_options=options, async_=False) as c:
        c.save(1, {"w": torch.ones(3)})
        assert weights(c, 1) == 1.0
    assert any(
        "ignores conditional writes" in r.getMessage() and "best effort" in r.getMessage() for r in caplog.records
    )
    keys = bucket_keys(s3_client, s3_bucket)
    assert "runs/r/lease/gen-000000000001.json" in keys
    assert [k for k in keys if ".probe-" in k] == []


def test_a_server_answering_501_to_conditional_writes_is_refused_unless_opted_out(
    s3_proxy: Any, s3_proxy_options: dict[str, Any], s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that says it has no conditional writes cannot fence either: refused, as one the probe catches."""
    url = f"s3://{s3_bucket}/runs/r"
    s3_proxy.inject("501", count=1000, match=lambda m, p: m == "PUT" and "/lease/" in p)
    with (
        pytest.raises(StoreError, match="does not support conditional writes") as raised,
        Checkpointer(url, storage_options=s3_proxy_options, async_=False) as c,
    ):
        c.acquire(timeout=10)
    message = str(raised.value)
    assert url in message and "unsafe_no_conditional_writes" in message, f"{message}"
    s3_proxy.clear()
    s3_proxy.inject("501", count=1, match=lambda m, p: m == "PUT" and "/lease/.probe-" in p)
    options = {**s3_proxy_options, "unsafe_no_conditional_writes": True}
    with caplog.at_level(logging.WARNING), Checkpointer(url, storage_options=options, async_=False) as c:
        c.save(1, {"w": torch.ones(3)})
        assert weights(c, 1) == 1.0
    assert any("does not support conditional writes" in r.getMessage() for r in caplog.records)


def test_the_probe_passes_on_an_honest_server_once_per_store_and_leaves_nothing(
    s3_proxy: Any, s3_proxy_options: dict[str, Any], s3_bucket: str, s3_client: Any
) -> None:
    url = f"s3://{s3_bucket}/runs/r"
    with open_store(url, storage_options=s3_proxy_options) as store:
        assert store.create_file("lease/a", b"1") is True
        assert store.create_file("lease/a", b"2") is False
        assert store.create_file("lease/b", b"3") is True
        assert bytes(store.read_file("lease/a")) == b"1"
    # The probe's whole cost, once per store: two small PUTs and a DELETE.
    assert s3_proxy.count("PUT", "/lease/.probe-") == 2
    assert s3_proxy.count("DELETE", "/lease/.probe-") == 1
    assert [r.method for r in s3_proxy.requests if ".probe-" in r.path] == ["PUT", "PUT", "DELETE"]
    with Checkpointer(url, storage_options=s3_proxy_options, async_=False) as c:
        c.save(1, {"w": torch.ones(3)})
    assert not [k for k in bucket_keys(s3_client, s3_bucket) if ".probe-" in k]


def test_two_writers_racing_through_a_server_that_ignores_conditional_writes_are_both_refused(
    ignoring: dict[str, Any], s3_bucket: str, s3_client: Any
) -> None:
    import threading

    url = f"s3://{s3_bucket}/runs/r"
    both_listed = threading.Barrier(2, timeout=20)  # both saw an empty lease/ and create generation 1 together
    outcomes: list[object] = []

    def writer() -> None:
        store = open_store(url, storage_options=ignoring)
        create = store.create_file

        def racing_create(path: str, data: bytes) -> bool:
            both_listed.wait()
            return create(path, data)

        store.create_file = racing_create  # type: ignore[method-assign]
        try:
            with Checkpointer(store, async_=False) as c:
                c.save(1, {"w": torch.ones(3)}, reason="notice")
                outcomes.append("durable")
        except Exception as e:  # recorded, judged below
            outcomes.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 2
    assert "durable" not in outcomes, f"{outcomes}"  # neither was told its save was durable under a shared generation
    assert [isinstance(o, StoreError) for o in outcomes] == [True, True], f"{outcomes}"
    assert ["ignores conditional writes" in str(o) for o in outcomes] == [True, True], f"{outcomes}"
    assert not [k for k in bucket_keys(s3_client, s3_bucket) if "manifest" in k or ".probe-" in k or "gen-" in k]


# ----------------------------------------------------------------------------- containers on one node


def _dead_pid() -> int:
    """A pid that no process has in this namespace now (a child started and reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("pid", ["dead here", "this process"])
def test_a_live_holder_in_another_pid_namespace_on_this_machine_is_never_taken_for_dead(
    tmp_path: Path, pid: str
) -> None:
    """Two pods on one node share the boot id, not the pid numbering: the holder's pid means nothing here."""
    from datetime import datetime, timezone

    from spotsafe.processes import boot_id, pid_namespace

    store = LocalStore(tmp_path)
    now = datetime.now(timezone.utc)
    holder = LeaseRecord(
        generation=1,
        host="node-1",
        pid=_dead_pid() if pid == "dead here" else os.getpid(),
        boot_id=boot_id(),
        process_start="",
        token="otherpod",
        acquired=now,
        renewed=now,
        lease_seconds=30.0,
        pid_namespace="pid:[1]" if pid_namespace() != "pid:[1]" else "pid:[2]",  # another pod's
    )
    assert store.create_file("lease/gen-000000000001.json", holder.to_json())
    with pytest.raises(spotsafe.LeaseTimeout):
        Lease(store, seconds=30).acquire(timeout=1.0)  # a live writer in another pod: wait for it
    # The same record from this very namespace: its pid is dead here, so it is dead.
    mine = replace(holder, generation=2, pid=_dead_pid(), pid_namespace=pid_namespace())
    assert store.create_file("lease/gen-000000000002.json", mine.to_json())
    taker = Lease(store, seconds=30)
    assert taker.acquire(timeout=10) == 3
    assert taker.takeover is not None and "is dead" in taker.takeover
    taker.release()


# ----------------------------------------------------------------------------- a store whose create is not exclusive


class OverwritingStore(LocalStore):
    """A backend whose create_file overwrites and says it won: as a server ignoring If-None-Match does."""

    def create_file(self, path: str, data: bytes) -> bool:
        self.commit_file(path, data)
        return True


def test_a_store_whose_create_is_not_exclusive_is_refused_before_any_takeover(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="create_file is not exclusive") as raised:
        Checkpointer(OverwritingStore(tmp_path), async_=False).save(1, {"w": torch.ones(3)})
    assert str(tmp_path) in str(raised.value)
    assert not list(tmp_path.glob("lease/gen-*")) and not list(tmp_path.glob("lease/.probe-*"))
    assert not list(tmp_path.glob("step-*"))
    # An honest store is probed once per store object, and the probe leaves nothing behind.
    with Checkpointer(LocalStore(tmp_path), async_=False) as c:
        c.save(1, {"w": torch.ones(3)})
        c.save(2, {"w": torch.ones(3)})
    assert sorted(p.name for p in (tmp_path / "lease").iterdir()) == ["gen-000000000001.json"]
