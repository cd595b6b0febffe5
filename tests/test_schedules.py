"""Writer fencing, proven by exploring the interleavings (issue 24): the harness is tests/schedules.py.

The bound. Writer W (generation 1) commits step 50 and is killed mid-save of 150; writer A
(the next process on W's volume) saves 100, 150, 200 with ``keep_last=2`` (cleanup, write,
commit, retention: every store operation of it is a pause point, before and after). At each
point B takes over and runs its phases (acquire, restore the latest and check it, save twice
past it with retention, close), then A wakes and goes on. Besides: three writers (A paused at
4 telling points x B paused at 4 points, C taking over), the mirror's upload thread of A as a
party (each of its operations), and injected lease-read and lease-listing errors. The
default run takes every point on the local store and every third (S3) or every other
(mirror) elsewhere; the ``slow`` run takes every point everywhere, the mirror over moto S3.
Each test prints how many schedules it ran.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import schedules as sch
from tests.helpers import slow_enabled

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


def explore(fresh: Any, schedules: Sequence[sch.Schedule], what: str, capsys: pytest.CaptureFixture[str]) -> None:
    broken: list[str] = []
    for schedule in schedules:
        world, problems = sch.run_schedule(fresh(), schedule)
        if problems:
            broken.append("\n".join(problems) + f"\n  paused at: {[str(w.controller.hit) for w in world.writers]}")
    with capsys.disabled():
        print(f"\n{what}: {len(schedules)} schedules, {len(broken)} broke the invariant")
    assert not broken, f"{len(broken)} of {len(schedules)} schedules broke the invariant:\n" + "\n".join(broken[:8])


STRIDE = {"local": 1, "s3": 3, "mirror": 2}


@pytest.mark.parametrize("kind", ["local", "s3", "mirror"])
def test_every_pause_point_of_a_superseded_writer_against_a_successor(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = slow_enabled(request.config)
    fresh = make_backend(kind, tmp_path, request, s3_remote=slow and kind == "mirror")
    ops = sch.dry_run(fresh())
    stride = 1 if slow else STRIDE[kind]
    schedules = sch.enumerate_a(ops, kind, lanes=("driver",), stride=stride)
    if kind == "mirror":
        schedules += sch.upload_schedules(ops, kind, stride=stride)
    counts = {lane: len(o) for lane, o in ops.items()}
    explore(fresh, schedules, f"{kind}: A's operations {counts}, every {stride}", capsys)


@pytest.mark.parametrize("kind", ["local", "s3", "mirror"])
def test_three_writers_and_injected_lease_read_errors(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = slow_enabled(request.config)
    if kind != "local" and not slow:
        pytest.skip("three writers and read errors on S3 and the mirror: the slow run (SPOTSAFE_SLOW=1)")
    fresh = make_backend(kind, tmp_path, request, s3_remote=slow and kind == "mirror")
    schedules = sch.three_writer_schedules(kind) + sch.read_error_schedules(kind)
    explore(fresh, schedules, f"{kind}: three writers and lease read errors", capsys)
