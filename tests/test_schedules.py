"""Writer fencing, proven by exploring the interleavings (issue 24): the harness is tests/schedules.py.

The bound. Writer W (generation 1) commits step 50 and is killed mid-save of 150; writer A
(the next process on W's volume) saves 100, 150, 200 with ``keep_last=2`` (cleanup, write,
commit, retention: every store operation of it is a pause point, before and after). At each
point B takes over and runs its phases (acquire, restore the latest and check it, save twice
past it with retention, close), then A wakes and goes on. Besides: three writers (A paused at
4 telling points x B paused at 4 points, C taking over), the mirror's upload thread of A as a
party (each of its operations), and injected lease-read and lease-listing errors. The
default run takes every 4th operation on the local store, every 12th on the mirror (remote: a
local directory) and A's four telling points on S3 (moto costs seconds per schedule here), plus
the three-writer and read-error schedules on the local store; the opt-in ``slow`` run
(``SPOTSAFE_SLOW=1`` or ``pytest -m slow``) takes every operation on every backend, the mirror
over moto S3, with the three-writer and read-error schedules on each.
Each test prints how many schedules it ran.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import spotsafe
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.errors import LeaseTimeout, StoreError, WriterFenced
from spotsafe.storage.base import Store
from spotsafe.storage.local import LocalStore
from spotsafe.storage.registry import open_store
from tests import schedules as sch
from tests.helpers import slow_enabled, stop_child

_prefixes = itertools.count()


@pytest.fixture(autouse=True)
def lease_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Writers in one process take over from each other at once (a frozen writer's renewals stop too).
    monkeypatch.setenv("SPOTSAFE_LEASE_SECONDS", "5")
    yield


def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest, *, s3_remote: bool = False) -> Any:
    """A factory of fresh backends of ``kind`` (one per schedule: a new directory or prefix)."""
    bucket = options = None
    if kind == "s3" or s3_remote:
        bucket = request.getfixturevalue("s3_bucket")
        options = request.getfixturevalue("s3_options")

    def fresh() -> sch.Backend:
        n = next(_prefixes)
        root = tmp_path / f"s{n}"
        root.mkdir()
        url = f"s3://{bucket}/sched-{n}" if bucket is not None else None
        return sch.Backend(kind, root, url, options)

    return fresh


def explore(
    fresh: Any, schedules: Sequence[sch.Schedule], what: str, capsys: pytest.CaptureFixture[str], request: Any = None
) -> None:
    """Run every schedule; fail naming each that broke the invariant. The count is printed (``-s``)
    and recorded as the test's ``schedules`` property (``--junitxml``)."""
    broken: list[str] = []
    for schedule in schedules:
        world, problems = sch.run_schedule(fresh(), schedule)
        if problems:
            broken.append("\n".join(problems) + f"\n  paused at: {[str(w.controller.hit) for w in world.writers]}")
    if request is not None:
        request.node.user_properties.append(("schedules", len(schedules)))
    with capsys.disabled():
        print(f"\n{what}: {len(schedules)} schedules, {len(broken)} broke the invariant")
    shown = "\n".join(broken[:8])
    assert broken == [], f"{len(broken)} of {len(schedules)} schedules broke the invariant:\n{shown}"


#: The default run's stride through A's operations per backend (the slow run: 1). S3 through moto
#: costs seconds per schedule here, so its default run takes A's four telling points instead.
STRIDE = {"local": 4, "s3": 0, "mirror": 12}


def pause_point_schedules(kind: str, ops: dict[str, list[sch.Op]], stride: int) -> list[sch.Schedule]:
    if stride:
        schedules = sch.enumerate_a(ops, kind, lanes=("driver",), stride=stride)
    else:
        schedules = [sch.Schedule(kind, point) for point in sch.a_points()]
    if kind == "mirror":
        schedules += sch.upload_schedules(ops, kind, stride=stride)
    return schedules


def lanes(ops: dict[str, list[sch.Op]]) -> dict[str, int]:
    return {lane: len(o) for lane, o in ops.items() if lane in ("driver", "upload")}


@pytest.mark.parametrize("kind", ["local", "s3", "mirror"])
def test_every_pause_point_of_a_superseded_writer_against_a_successor(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = make_backend(kind, tmp_path, request)
    ops = sch.dry_run(fresh())
    stride = STRIDE[kind]
    schedules = pause_point_schedules(kind, ops, stride)
    explore(fresh, schedules, f"{kind}: A's operations {lanes(ops)}, every {stride or 'telling one'}", capsys, request)


@pytest.mark.parametrize("kind", ["local"])
def test_three_writers_and_injected_lease_read_errors(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = make_backend(kind, tmp_path, request)
    schedules = sch.three_writer_schedules(kind) + sch.read_error_schedules(kind)
    explore(fresh, schedules, f"{kind}: three writers and lease read errors", capsys, request)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # S3 through moto: about 9 s a schedule on a loaded machine
@pytest.mark.parametrize("kind", ["local", "s3", "mirror"])
def test_every_schedule_exhaustively(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every operation of A (and of its uploader), before and after; three writers; read errors.
    The mirror's remote is moto S3 here. Opt-in: ``SPOTSAFE_SLOW=1`` or ``pytest -m slow``."""
    if not slow_enabled(request.config):
        pytest.skip("the exhaustive schedules take many minutes: SPOTSAFE_SLOW=1 or pytest -m slow")
    fresh = make_backend(kind, tmp_path, request, s3_remote=kind == "mirror")
    ops = sch.dry_run(fresh())
    schedules = pause_point_schedules(kind, ops, 1)
    schedules += sch.three_writer_schedules(kind) + sch.read_error_schedules(kind)
    explore(
        fresh,
        schedules,
        f"{kind} (slow): A's operations {lanes(ops)}, all; three writers; read errors",
        capsys,
        request,
    )


# ----------------------------------------------------------------------------- the six cases of issue 24


@pytest.fixture(params=["local", "s3"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> sch.Backend:
    """One fresh shared store: a local directory or a moto S3 prefix."""
    return make_backend(request.param, tmp_path, request)()  # type: ignore[no-any-return]


def must_hold(world: sch.World, label: str) -> None:
    problems = sch.check_invariant(world, label)
    shown = "\n".join(problems)
    assert problems == [], f"{shown}\nthe last operations, in order:\n{world.journal.tail(40)}"


def test_case1_a_late_manifest_never_replaces_the_successors_checkpoint(shared: sch.Backend) -> None:
    """A stops right before its step-100 manifest; B takes over, resumes at 50, saves 100 (durable);
    A wakes and publishes its manifest; B saves 150 (its retention runs). B's 100 must stay."""
    world = sch.World(shared, keep_last=3)
    try:
        a = world.writer("A", 2)
        assert a.save(50), f"{a.fenced}"
        a.controller.pause = sch.Point(method=r"commit_file|create_file", path=sch.manifest_of(100))
        a.run(lambda w: w.save(100))
        assert sch.wait_paused_or_done(a), "A never reached its step-100 manifest"
        b = world.writer("B", 3)
        b.acquire()
        assert b.restore() == 50
        assert b.save(100), f"{b.fenced}"
        a.controller.resume()
        a.shutdown()
        assert not any(s.returned for s in world.saves if s.writer == "A" and s.step == 100)
        assert b.save(150), f"{b.fenced}"
        b.close()
    finally:
        world.close()
    must_hold(world, "case 1")


def test_case2_a_late_cleanup_never_deletes_the_successors_checkpoint(shared: sch.Backend) -> None:
    """W was killed mid-save of step 150 (its directory has no manifest). A's cleanup looks, finds
    it unfinished, and stops right before deleting it; B takes over and commits 100 and 150; A wakes."""
    world = sch.World(shared, keep_last=3)
    try:
        sch.seed(world)  # W: 50 committed, 150 unfinished
        a = world.writer("A", 2, volume="volume-A")
        a.controller.pause = sch.Point(method="delete_dir", path=sch.dir_of(150))
        a.run(lambda w: w.save(100))
        assert sch.wait_paused_or_done(a), "A's cleanup never came to the unfinished step 150"
        b = world.writer("B", 3)
        b.acquire()
        assert b.restore() == 50
        assert b.save(100), f"{b.fenced}"
        assert b.save(150), f"{b.fenced}"
        a.controller.resume()
        a.shutdown()
        b.close()
    finally:
        world.close()
    must_hold(world, "case 2")


#: A live writer in its own process: holds the store, renews, saves ``step`` on each line of stdin.
HOLDER = textwrap.dedent("""
    import json, sys, torch
    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.errors import WriterFenced
    from spotsafe.storage.registry import open_store
    cfg = json.loads(sys.argv[1])
    c = Checkpointer(open_store(cfg["store"], storage_options=cfg.get("options")), async_=False)
    c.save(1, {"w": torch.ones(4)})
    print("held", flush=True)
    for line in sys.stdin:
        try:
            c.save(int(line), {"w": torch.ones(4)})
            print("saved", int(line), flush=True)
        except WriterFenced as e:
            print("fenced", e, flush=True)
    c.close()
""")


def test_case3_a_failed_lease_read_is_never_taken_for_an_expired_lease(
    shared: sch.Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live writer in another process renews its lease; every read of it by a would-be
    replacement fails (an S3 500 after the retries, EIO on NFS). No takeover, however long."""
    period = 2.0
    monkeypatch.setenv("SPOTSAFE_LEASE_SECONDS", str(period))
    store = shared.s3_url or str(shared.root / "store")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen(
        [sys.executable, str(script), json.dumps({"store": store, "options": shared.s3_options})],
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        world = sch.World(shared)
        try:
            b = world.writer("B", 3)
            b.controller.faults = [sch.Fault(sch.Point(method="read_file", path=sch.LEASE), times=None)]
            with pytest.raises(LeaseTimeout):
                b.ckpt.acquire(timeout=3 * period)  # three lease periods of failed reads
            assert b.controller.faults[0].raised >= 2
            # A listing of lease/ failing too: an error, never a takeover.
            b.controller.faults.append(sch.Fault(sch.Point(method="listdir", path=sch.LEASE), times=None))
            with pytest.raises((LeaseTimeout, StoreError)):
                b.ckpt.acquire(timeout=period)
            assert b.ckpt.lease is None or b.ckpt.lease.generation is None
        finally:
            world.close()
        holder.stdin.write("2\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "saved 2"  # the live writer was never fenced
        holder.stdin.close()
        assert holder.wait(60) == 0
        with Checkpointer(shared.shared(), async_=False) as reader:
            assert [i.step for i in reader.list()] == [1, 2]
    finally:
        stop_child(holder)


@pytest.mark.parametrize("remote", ["local", "s3"])
def test_case4_a_stale_volume_never_shadows_nor_destroys_the_newer_remote_checkpoint(
    remote: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A (mirror on volume A) commits 200 locally and stops before uploading it. B (volume B) takes
    over through the remote, commits 150 and 200. A's instance comes back: a new process on volume A
    must resume from B's 200, and neither its saves and retention nor the old process's uploader
    (woken at last) may destroy B's 200 on any tier."""
    backend = make_backend("mirror", tmp_path, request, s3_remote=remote == "s3")()
    world = sch.World(backend, keep_last=3)
    try:
        a = world.writer("A", 2, volume="volume-A")
        assert a.save(100), f"{a.fenced}"  # committed and uploaded
        # A's uploader stops before its first remote write of step 200 (the instance stopped).
        a.controller.pause = sch.Point(lane="upload", method=r"write_file|write_files|commit_file", path=r"step-0*200")
        a.run(lambda w: w.save(200))
        assert sch.wait_paused_or_done(a), "A's uploader never came to step 200"
        b = world.writer("B", 3, volume="volume-B")
        b.acquire()
        assert b.restore() == 100
        assert b.save(150), f"{b.fenced}"
        assert b.save(200), f"{b.fenced}"
        b.close()
        again = world.writer("A2", 4, volume="volume-A")  # A's instance back: a new process, A's volume
        again.acquire()
        again.restore()  # checked by the invariant: B's 200 (world.errors says which it was)
        assert again.save(250), f"{again.fenced}"
        assert again.save(300), f"{again.fenced}"
        again.close()
        a.controller.resume()  # the old process's uploader wakes at last
        a.shutdown()
    finally:
        world.close()
    must_hold(world, "case 4")


class NonConditional(sch.Scheduled):
    """A server that ignores conditional writes: every create succeeds, overwriting what was there."""

    def create_file(self, path: str, data: bytes) -> bool:
        self.controller.op("create_file", path, lambda: self.inner.commit_file(path, data))
        return True


def race_for_an_empty_store(open_one: Any) -> dict[str, object]:
    """Two writers, each on its own store from ``open_one(name)``, create generation 1 at the same
    instant and save step 1; what came of each: "durable" or the exception."""
    both = threading.Barrier(2, timeout=60)
    outcomes: dict[str, object] = {}

    def writer(name: str) -> None:
        store = open_one(name)
        inner_create = store.create_file

        def racing(path: str, data: bytes) -> bool:
            if "gen-" in path:
                both.wait()  # both looked at an empty lease/ and create generation 1 together
            return inner_create(path, data)

        store.create_file = racing  # type: ignore[method-assign]
        try:
            with Checkpointer(store, async_=False) as c:
                c.save(1, {"w": torch.full((4,), float(len(name)))}, reason="notice")
            outcomes[name] = "durable"
        except Exception as e:  # judged below
            outcomes[name] = e

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("A", "AA")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["A", "AA"], f"{outcomes}"
    return outcomes


def assert_refused(outcomes: dict[str, object], where: str) -> None:
    """The first exclusive create on each store probes it: such a store is refused before anything is saved."""
    for name, outcome in outcomes.items():
        assert isinstance(outcome, StoreError) and not isinstance(outcome, WriterFenced), f"{(name, outcomes)}"
        assert where in str(outcome), f"{outcome}"


def test_case5_a_server_ignoring_if_none_match_is_refused_not_raced(
    s3_proxy: Any, s3_proxy_options: dict[str, Any], s3_bucket: str
) -> None:
    """An S3-compatible server that answers 200 to If-None-Match: * and overwrites (moto behind a
    proxy that strips the header): two writers racing for an empty store are both refused by the
    probe, never both told their save is durable."""
    s3_proxy.strip_headers = {"if-none-match"}
    url = f"s3://{s3_bucket}/runs/r"
    outcomes = race_for_an_empty_store(lambda name: open_store(url, storage_options=s3_proxy_options))
    assert_refused(outcomes, url)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_case5_a_store_whose_create_is_not_exclusive_is_refused_not_silently_unfenced(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two writers race for an empty store whose create_file always succeeds, overwriting (what an
    S3-compatible server answering 200 to If-None-Match: * does): the store is refused, loudly."""
    backend = make_backend(kind, tmp_path, request)()
    outcomes = race_for_an_empty_store(
        lambda name: NonConditional(backend.shared(), sch.Controller(name, sch.Journal()))
    )
    assert_refused(outcomes, backend.s3_url or str(backend.root / "store"))


def store_files(store: Store, directory: str = "") -> dict[str, bytes]:
    """Every file under ``directory`` but the checkpoints' and the lease's, with its content."""
    out: dict[str, bytes] = {}
    for name in store.listdir(directory):
        path = f"{directory}/{name}" if directory else name
        if not directory and (name == "lease" or name.startswith("step-")):
            continue
        if store.file_size(path) is not None:
            out[path] = bytes(store.read_file(path))
        else:
            out.update(store_files(store, path))
    return out


def test_case6_a_fenced_run_writes_nothing_more_to_the_store(shared: sch.Backend) -> None:
    """Run A is superseded by Run B (which finishes its launch and writes its events and report);
    A's next step finds itself fenced: from then on it writes no event, no report, nothing."""
    where = shared.s3_url or str(shared.root / "store")
    options = shared.s3_options
    model = torch.nn.Linear(3, 2)
    common: dict[str, Any] = {"watch": False, "every_steps": 1, "async_": False, "report_every": 3600.0}
    a = spotsafe.Run(where, model=model, exit_on_notice=False, storage_options=options, **common)
    a.step()
    b = spotsafe.Run(where, model=torch.nn.Linear(3, 2), storage_options=options, **common)
    assert b.resumed_from is not None and b.resumed_from.step == 1
    b.step()
    b.close(refresh_report=True)
    reader = shared.shared()
    try:
        before = store_files(reader)
        assert any(p.startswith("events/") for p in before), f"{sorted(before)}"
        with pytest.raises(WriterFenced):
            a.step()  # fenced: raises (exit_on_notice=False) after closing
        after = store_files(reader)
        assert sorted(after) == sorted(before), f"the fenced run wrote {sorted(set(after) - set(before))}"
        changed = [p for p in before if after[p] != before[p]]
        assert changed == [], f"the fenced run rewrote {changed}"
        with Checkpointer(reader, async_=False) as c:
            assert [i.step for i in c.list()] == [1, 2]
    finally:
        a.close()
        reader.close()


def test_case6_a_takeover_skipping_a_generation_through_a_mirror_still_fences_the_old_writer(tmp_path: Path) -> None:
    """The mirror's tiers disagree about the top generation: the replacement's volume carries
    generation 2 of an earlier history, so it takes generation 3 and the remote never holds a 2.
    The old writer, paused before its manifest, must be fenced by 3 (not only by 2)."""
    backend = sch.Backend("mirror", tmp_path)
    world = sch.World(backend, keep_last=3)
    try:
        a = world.writer("A", 1, volume="volume-A")
        assert a.save(50), f"{a.fenced}"
        # The replacement's own volume: two earlier generations, both released.
        for _ in (1, 2):
            with Checkpointer(LocalStore(tmp_path / "volume-B"), async_=False) as earlier:
                earlier.acquire(timeout=10)
        a.controller.pause = sch.Point(method=r"commit_file|create_file", path=sch.manifest_of(100))
        a.run(lambda w: w.save(100))
        assert sch.wait_paused_or_done(a)
        b = world.writer("B", 3, volume="volume-B")
        b.acquire()
        assert world.generations["B"] == 3
        b.restore()  # A's 50: checked by the invariant
        assert b.save(100), f"{b.fenced}"
        a.controller.resume()
        a.shutdown()
        assert isinstance(a.fenced, WriterFenced), f"{a.fenced}"
        assert b.save(150), f"{b.fenced}"
        b.close()
    finally:
        world.close()
    must_hold(world, "case 6 (mirror top generation)")
