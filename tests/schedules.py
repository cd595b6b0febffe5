"""A schedule-exploring harness for writer fencing (issue 24): real writers, paused at store operations.

Writers are real :class:`~spotsafe.checkpoint.writer.Checkpointer` objects, each running in a
thread of the test process on its own store (its own real store object over the same
directory, bucket prefix or mirror: as separate instances would). Each writer's store is wrapped
in a :class:`Scheduled` store whose :class:`Controller` can

- pause the writer *before* or *after* any store operation: the Nth operation of a lane (the
  writer's own threads: the caller, its save and retention threads = lane ``driver``; a mirror's
  upload thread = lane ``upload``), or the first operation whose method and path match patterns
  (a manifest, a delete). A pause freezes every thread of that writer at its next store operation
  too (its lease renewals, its uploader), as a stopped process would be;
- inject errors: an operation matching patterns raises :class:`~spotsafe.errors.StoreError`
  (a read or listing of the lease failing, a manifest commit failing).

The pause points are the store operations themselves, so the writers run their real code; the
harness knows nothing of directory names (it asks ``Checkpointer.list``/``latest``/``load`` and
``CheckpointInfo.generation``). Paths are matched by patterns that accept both the legacy
``step-N`` and the generation-named ``step-N-gG`` directories.

The invariant (:func:`check_invariant`), checked after each schedule on fresh stores:

1. every save() that returned is readable with its values by ``load(step)`` until the newest
   generation's own retention removes it (the newest ``keep_last`` steps must all be there), and
   ``latest()``/``load()`` give the newest of them;
2. nothing a superseded writer committed after its successor took over is visible: every
   checkpoint ``list()`` shows holds the values of a returned save of its step (the newest
   generation's), or of an unreturned save the successor adopted (its step at or below the step
   the successor restored from).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotsafe.checkpoint.catalog import Catalog
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.errors import SpotsafeError, StoreError
from spotsafe.storage.base import Store
from spotsafe.storage.local import LocalStore
from spotsafe.storage.mirror import MirrorStore
from spotsafe.storage.registry import open_store

#: Store methods that are not operations on the stored bytes (never paused, never counted).
LIFECYCLE = frozenset({"set_fence", "set_deadline", "flush", "close", "tiers"})


#: The manifest of step ``n`` (legacy ``step-N/manifest.json`` or ``step-N-gG/manifest.json``).
def manifest_of(step: int) -> str:
    return rf"(^|/)step-0*{step}(-g\d+)?/manifest\.json$"


#: The directory of step ``n`` (as delete_dir names it).
def dir_of(step: int) -> str:
    return rf"(^|/)step-0*{step}(-g\d+)?/?$"


LEASE = r"(^|/)lease(/|$)"


def lane_of(thread: threading.Thread) -> str:
    """Which of a writer's threads an operation comes from: driver, upload or lease (renewals)."""
    name = thread.name
    if name.startswith("spotsafe-mirror-upload"):
        return "upload"
    if name.startswith("spotsafe-lease"):
        return "lease"
    if name.startswith(("spotsafe-events", "spotsafe-live")):
        return "story"
    return "driver"


@dataclass
class Point:
    """Where to pause (or fail): the ``index``-th operation of ``lane``, or the first matching op."""

    lane: str = "driver"
    index: int | None = None
    method: str | None = None  # a regex on the Store method name
    path: str | None = None  # a regex searched in the operation's path(s)
    when: str = "before"  # before | after
    #: Skip this many matches first (only with method/path).
    skip: int = 0

    def matches(self, lane: str, index: int, method: str, path: str) -> bool:
        if lane != self.lane:
            return False
        if self.index is not None:
            return index == self.index
        if self.method is not None and not re.fullmatch(self.method, method):
            return False
        return self.path is None or re.search(self.path, path) is not None

    def __str__(self) -> str:
        where = f"#{self.index}" if self.index is not None else f"{self.method or '*'}({self.path or '*'})"
        skip = f" (skipping {self.skip})" if self.skip else ""
        return f"{self.when} {self.lane} op {where}{skip}"


@dataclass
class Fault:
    """Operations matching ``point`` raise StoreError, ``times`` times (None: always)."""

    point: Point
    times: int | None = 1
    raised: int = 0
    matched: int = 0


@dataclass(frozen=True)
class Op:
    writer: str
    lane: str
    index: int
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.writer}.{self.lane}#{self.index} {self.method}({self.path})"


class Journal:
    """Every operation of every writer of one schedule, in order (for failure messages)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._lock = threading.Lock()

    def add(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def tail(self, n: int = 60) -> str:
        with self._lock:
            return "\n".join(f"  {op}" for op in self.ops[-n:])


class Controller:
    """One writer's plan: where it pauses, which operations fail; shared by its store wrappers."""

    def __init__(self, name: str, journal: Journal) -> None:
        self.name = name
        self.journal = journal
        self.pause: Point | None = None
        self.faults: list[Fault] = []
        self.counts: dict[str, int] = {}
        self.seen: dict[str, list[Op]] = {}
        self.hit: Op | None = None
        self.paused = threading.Event()
        self._frozen = False
        self._cond = threading.Condition()
        self._skipped = 0

    def op(self, method: str, path: str, call: Callable[[], Any]) -> Any:
        lane = lane_of(threading.current_thread())
        with self._cond:
            while self._frozen:
                self._cond.wait()
            index = self.counts.get(lane, 0)
            self.counts[lane] = index + 1
            op = Op(self.name, lane, index, method, path)
            self.seen.setdefault(lane, []).append(op)
            pause = self._take(self.pause, op, "before")
            fault = next((f for f in self.faults if self._due(f, op)), None)
        self.journal.add(op)
        if pause:
            self._freeze(op)
        if fault is not None:
            raise StoreError(5, f"{path}: {method} failed: Input/output error (injected by the test harness)")
        result = call()
        with self._cond:
            pause = self._take(self.pause, op, "after")
        if pause:
            self._freeze(op)
        return result

    def _take(self, point: Point | None, op: Op, when: str) -> bool:
        if point is None or point.when != when or not point.matches(op.lane, op.index, op.method, op.path):
            return False
        if point.index is None and self._skipped < point.skip:
            self._skipped += 1
            return False
        self.pause = None  # a plan pauses once
        return True

    def _due(self, fault: Fault, op: Op) -> bool:
        if fault.times is not None and fault.raised >= fault.times:
            return False
        if not fault.point.matches(op.lane, op.index, op.method, op.path):
            return False
        fault.matched += 1
        if fault.matched <= fault.point.skip:
            return False
        fault.raised += 1
        return True

    def _freeze(self, op: Op) -> None:
        with self._cond:
            self._frozen = True
            self.hit = op
            self.paused.set()
            while self._frozen:
                self._cond.wait()

    def resume(self) -> None:
        """Wake the writer; its plan is spent (nothing pauses it again)."""
        with self._cond:
            self.pause = None
            self._frozen = False
            self._cond.notify_all()


def _paths(args: Sequence[Any]) -> str:
    if not args:
        return ""
    first = args[0]
    if isinstance(first, str):
        return first
    if isinstance(first, (list, tuple)):
        return ",".join(str(item[0]) for item in first if isinstance(item, tuple) and item)
    return ""


class Scheduled(Store):
    """A store that runs every operation of a real store through a :class:`Controller`."""

    def __init__(self, inner: Store, controller: Controller) -> None:
        self.inner = inner
        self.controller = controller
        self.url = inner.url
        self.segment_size = inner.segment_size
        self.local_dir = inner.local_dir

    def __repr__(self) -> str:
        return f"Scheduled({self.inner!r}, {self.controller.name})"

    def set_fence(self, check: Callable[[], None]) -> None:
        self.inner.set_fence(check)

    def set_deadline(self, deadline: Any) -> None:
        self.inner.set_deadline(deadline)

    def flush(self, timeout: float | None = None) -> bool:
        return self.inner.flush(timeout)

    def close(self) -> None:
        self.inner.close()


def _wrap(name: str) -> Callable[..., Any]:
    def method(self: Scheduled, *args: Any, **kwargs: Any) -> Any:
        inner = getattr(self.inner, name)
        return self.controller.op(name, _paths(args), lambda: inner(*args, **kwargs))

    method.__name__ = name
    return method


# Every operation the Store interface has (now or later: a method added to it is wrapped too).
for _name, _value in list(vars(Store).items()):
    if callable(_value) and not _name.startswith("_") and _name not in LIFECYCLE:
        setattr(Scheduled, _name, _wrap(_name))
Scheduled.__abstractmethods__ = frozenset()


# ----------------------------------------------------------------------------- the world of one schedule


@dataclass
class Save:
    writer: str
    step: int
    value: float
    generation: int | None = None
    returned: bool = False
    error: BaseException | None = None


@dataclass
class Backend:
    """How writers open the shared store: ``local``, ``s3`` (moto) or ``mirror`` (local volumes + a remote)."""

    kind: str
    root: Path
    s3_url: str | None = None
    s3_options: dict[str, Any] | None = None

    def remote(self) -> Store:
        if self.s3_url is not None:
            return open_store(self.s3_url, storage_options=self.s3_options)
        return LocalStore(self.root / "remote")

    def shared(self) -> Store:
        """The shared store, as a new process opens it (the remote tier of a mirror)."""
        return LocalStore(self.root / "store") if self.kind == "local" else self.remote()

    def open(self, controller: Controller | None, volume: str) -> Store:
        """A store for one writer (on its own ``volume``, for a mirror); wrapped when ``controller``."""

        def wrap(store: Store) -> Store:
            return store if controller is None else Scheduled(store, controller)

        if self.kind == "mirror":
            return MirrorStore(wrap(LocalStore(self.root / volume)), wrap(self.remote()))
        return wrap(self.shared())

    def views(self, volumes: Sequence[str]) -> Iterator[tuple[str, Store]]:
        """Fresh readers of the store: the shared store, and a mirror from each writer's volume."""
        yield "shared", self.shared()
        if self.kind == "mirror":
            for volume in volumes:
                if (self.root / volume).exists():
                    yield f"mirror from {volume}", MirrorStore(LocalStore(self.root / volume), self.remote())


class World:
    """One schedule: its backend, its writers' controllers, what each save did."""

    def __init__(self, backend: Backend, *, keep_last: int = 2) -> None:
        self.backend = backend
        self.keep_last = keep_last
        self.journal = Journal()
        self.saves: list[Save] = []
        self.restored: dict[str, int] = {}  # writer -> the step it restored from (-1: none)
        self.generations: dict[str, int] = {}
        self.volumes: list[str] = []
        self.writers: list[Writer] = []
        self.errors: list[str] = []

    def writer(self, name: str, ident: int, *, volume: str | None = None) -> Writer:
        controller = Controller(name, self.journal)
        volume = volume or f"volume-{name}"
        if volume not in self.volumes:
            self.volumes.append(volume)
        w = Writer(self, name, ident, controller, self.backend.open(controller, volume))
        self.writers.append(w)
        return w

    def close(self) -> None:
        for w in self.writers:
            w.controller.resume()
        for w in self.writers:
            w.shutdown()


def value_of(ident: int, step: int) -> float:
    return float(ident * 1_000_000 + step)


class Writer:
    """One instance: a Checkpointer (sync saves, so a returned save is durable) on a wrapped store."""

    def __init__(self, world: World, name: str, ident: int, controller: Controller, store: Store) -> None:
        self.world = world
        self.name = name
        self.ident = ident
        self.controller = controller
        self.ckpt = Checkpointer(store, keep_last=world.keep_last, async_=False)
        self.thread: threading.Thread | None = None
        self.fenced: BaseException | None = None

    def _generation(self) -> None:
        lease = self.ckpt.lease
        if lease is not None and lease.generation is not None:
            self.world.generations[self.name] = lease.generation

    def acquire(self) -> None:
        self.ckpt.acquire(timeout=60)
        self._generation()

    def restore(self) -> int:
        """Load the newest checkpoint (checking it against what was saved); the step, -1 when none."""
        info = self.ckpt.latest()
        step = -1
        if info is not None:
            state = self.ckpt.load()
            loaded = self.ckpt.last_loaded
            assert loaded is not None
            step = loaded.step
            got = float(state["w"][0])
            expected = {s.value for s in self.world.saves if s.step == step}
            if got not in expected or not torch.equal(state["w"], torch.full_like(state["w"], got)):
                self.world.errors.append(
                    f"{self.name} restored step {step} holding {got}, which no save of that step wrote "
                    f"(saves of it: {sorted(expected)})"
                )
        newer = [s for s in self.world.saves if s.returned and s.step > step]
        mine = self.world.generations.get(self.name, 0)
        if any(g > mine for g in self.world.generations.values()):
            # Superseded while it restored: it listed the store before the newer generation's
            # retention removed what it listed. Its saves are fenced; its view is no history.
            newer = []
        if newer:
            self.world.errors.append(
                f"{self.name} resumed from step {step} although the save of step {newer[-1].step} by "
                f"{newer[-1].writer} (generation {newer[-1].generation}) had returned"
            )
        self.world.restored.setdefault(self.name, step)
        return step

    def save(self, step: int) -> bool:
        record = Save(self.name, step, value_of(self.ident, step))
        self.world.saves.append(record)
        try:
            self.ckpt.save(step, {"w": torch.full((64,), record.value)}, reason="notice")
            self._generation()
            if self.world.backend.kind == "mirror":
                # Across volumes a save is the fleet's once uploaded: returned = saved and flushed,
                # and still the holder afterwards (a fenced upload is refused, rightly).
                self.ckpt.store.flush()
                lease = self.ckpt.lease
                if lease is None or not lease.held:
                    raise SpotsafeError("superseded before its upload: durable on this volume only")
        except Exception as e:  # recorded; a superseded writer's saves fail
            # A save can fail after its commit landed (the look after the commit could not read
            # the lease): the generation it wrote under is known all the same, so a newest
            # generation's copy of the step is recognised as its own (adopted), not a ghost.
            self._generation()
            record.error = e
            self.fenced = e
            return False
        record.generation = self.world.generations.get(self.name)
        record.returned = True
        return True

    def run(self, script: Callable[[Writer], None]) -> threading.Thread:
        def body() -> None:
            try:
                script(self)
            except Exception as e:  # a fenced writer stops; recorded
                self.fenced = e

        self.thread = threading.Thread(target=body, name=f"writer-{self.name}", daemon=True)
        self.thread.start()
        return self.thread

    def close(self) -> None:
        try:
            self.ckpt.close()
        except Exception as e:  # a superseded writer's close may re-raise its save's error
            self.fenced = self.fenced or e

    def shutdown(self) -> None:
        if self.thread is not None:
            self.thread.join(120)
            assert not self.thread.is_alive(), f"writer {self.name} is stuck:\n{self.world.journal.tail()}"
        self.close()


def wait_paused_or_done(w: Writer, timeout: float = 120) -> bool:
    """Wait until ``w`` froze at its pause point (True) or its script ended without reaching it (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.controller.paused.wait(0.02):
            return True
        if w.thread is not None and not w.thread.is_alive():
            return w.controller.paused.is_set()
    raise AssertionError(f"writer {w.name} neither paused nor finished:\n{w.world.journal.tail()}")


# ----------------------------------------------------------------------------- the invariant


def check_invariant(world: World, label: str) -> list[str]:
    """What breaks the invariant (module doc) in every view of the store; [] when nothing does."""
    problems = list(world.errors)
    gens = world.generations
    returned = [s for s in world.saves if s.returned]
    history: dict[int, Save] = {}
    for s in returned:
        have = history.get(s.step)
        if have is None or (s.generation or 0) >= (have.generation or 0):
            history[s.step] = s
    newest = max(gens.values(), default=0)

    def adopted(s: Save) -> bool:
        """An unreturned save of generation g that every later generation took into its history."""
        g = gens.get(s.writer)
        if g is None:
            return False
        if g == newest:
            return True
        return all(world.restored.get(w, -1) >= s.step for w, h in gens.items() if h > g)

    for view, store in world.backend.views(world.volumes):
        try:
            problems.extend(f"{view}: {p}" for p in _check_view(world, store, history, adopted))
        finally:
            store.close()
    return [f"{label}: {p}" for p in problems]


def _check_view(world: World, store: Store, history: dict[int, Save], adopted: Callable[[Save], bool]) -> list[str]:
    problems: list[str] = []
    catalog = Catalog(store)

    def value(step: int | None) -> float:
        return float(catalog.load(step)[1]["w"][0])

    try:
        visible = {info.step: info for info in catalog.list()}
        steps = sorted(set(history) | set(visible))
        kept = steps[-world.keep_last :]
        for step, info in sorted(visible.items()):
            got = value(step)
            want = history.get(step)
            if want is not None and got == want.value:
                continue
            allowed = [s for s in world.saves if s.step == step and s.value == got and not s.returned and adopted(s)]
            newer = want is not None and any(
                world.generations.get(a.writer, 0) > (want.generation or 0) for a in allowed
            )
            if (want is None and allowed) or newer:
                continue
            if (
                want is not None
                and step not in kept
                and any(s.returned and s.step == step and s.value == got for s in world.saves)
            ):
                # The newest generation saved this step again and its retention removed that copy;
                # an older generation's copy, committed before the takeover, is left on a volume
                # the newest writer never mounts (a mirror's stale local tier): not the run's
                # history, but nothing written after a takeover either.
                continue
            who = [s for s in world.saves if s.step == step and s.value == got]
            writer = who[0].writer if who else "nobody"
            if want is not None:
                problems.append(
                    f"step {step} holds {got} (writer {writer}, generation {info.generation}), "
                    f"not the returned save of {want.writer} (generation {want.generation}, {want.value})"
                )
            else:
                problems.append(
                    f"step {step} of a superseded writer is visible: {got} (writer {writer}, generation "
                    f"{info.generation}; successors restored from {world.restored})"
                )
        for step in kept:
            if step in history and step not in visible:
                s = history[step]
                problems.append(
                    f"the returned save of step {step} (writer {s.writer}, generation {s.generation}) is gone "
                    f"although the newest generation keeps its newest {world.keep_last} steps {kept}"
                )
        latest = catalog.latest()
        top = max(history, default=None)
        if top is not None and (latest is None or latest.step < top):
            problems.append(f"latest() is {latest and latest.step}, below the newest returned save, step {top}")
        if latest is not None and latest.step in history and value(None) != history[latest.step].value:
            problems.append(f"load() of the latest, step {latest.step}, does not hold its returned save")
    except Exception as e:  # a reader failing is a broken store: reported as such
        problems.append(f"reading failed: {type(e).__name__}: {e}")
    return problems


# ----------------------------------------------------------------------------- the schedules

#: Writer A's script: the steps it saves. A crashed writer W left step 150 unfinished before it.
A_STEPS = (100, 150, 200)
SEED_OK, SEED_CRASHED = 50, 150
#: How many steps past the one it restored each successor saves.
SUCCESSOR_STEPS = (50, 100)


def seed(world: World) -> None:
    """Writer W (generation 1): step 50 committed; its save of step 150 killed before its manifest."""
    w = world.writer("W", 1, volume="volume-A")  # A is the next process on W's instance
    assert w.save(SEED_OK), f"{w.fenced}"
    w.controller.faults = [
        Fault(Point(method=r"commit_file|create_file", path=manifest_of(SEED_CRASHED)), times=None),
        Fault(Point(method="delete_dir", path=dir_of(SEED_CRASHED)), times=None),
    ]
    assert not w.save(SEED_CRASHED)
    w.controller.faults = []
    w.shutdown()
    world.writers.remove(w)


def a_script(w: Writer) -> None:
    """A's saves, then its close (releasing the lease): every operation of it is a pause point."""
    for step in A_STEPS:
        if not w.save(step):
            break
    w.close()


def successor(w: Writer) -> None:
    """A replacement's phases: acquire, restore the latest, save twice past it, close."""
    w.acquire()
    base = w.restore()
    base = max(base, 0)
    for k in SUCCESSOR_STEPS:
        if not w.save(base + k):
            break
    w.close()


@dataclass
class Schedule:
    """Writer A pauses at ``a``; B takes over and runs its phases (pausing at ``b``, when given, for
    C to take over); then each paused writer wakes, newest first."""

    backend: str
    a: Point | None
    b: Point | None = None
    a_faults: list[Fault] = field(default_factory=list)
    b_faults: list[Fault] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [self.backend, f"A {self.a}" if self.a else "A unpaused"]
        if self.b:
            parts.append(f"B {self.b}, C takes over")
        parts += [f"A fails {f.point} x{f.times}" for f in self.a_faults]
        parts += [f"B fails {f.point} x{f.times}" for f in self.b_faults]
        return "; ".join(parts)


def run_schedule(backend: Backend, schedule: Schedule, *, keep_last: int = 2) -> tuple[World, list[str]]:
    """Run one schedule in a fresh store; the world and what broke the invariant."""
    world = World(backend, keep_last=keep_last)
    try:
        seed(world)
        a = world.writer("A", 2)
        a.controller.pause = schedule.a
        a.controller.faults = list(schedule.a_faults)
        a.run(a_script)
        wait_paused_or_done(a)
        b = world.writer("B", 3)
        b.controller.pause = schedule.b
        b.controller.faults = list(schedule.b_faults)
        b.run(successor)
        if schedule.b is not None and wait_paused_or_done(b):
            c = world.writer("C", 4)
            c.run(successor)
            c.shutdown()
            b.controller.resume()
        b.shutdown()
        a.controller.resume()
        a.shutdown()
    finally:
        world.close()
    return world, check_invariant(world, str(schedule))


def dry_run(backend: Backend) -> dict[str, list[Op]]:
    """Writer A's operations per lane when nothing pauses it (the pause points to enumerate)."""
    world = World(backend)
    try:
        seed(world)
        a = world.writer("A", 2)
        a.run(a_script)
        a.shutdown()
        a.ckpt.store.flush()
    finally:
        world.close()
    problems = check_invariant(world, "dry run")
    assert not problems, f"{problems}"
    return a.controller.seen


_fresh = itertools.count()


def enumerate_a(ops: dict[str, list[Op]], backend: str, *, lanes: Sequence[str], stride: int = 1) -> list[Schedule]:
    """Every ``stride``-th operation of A's ``lanes``, before and after: one schedule each."""
    out = []
    for lane in lanes:
        for op in ops.get(lane, [])[::stride]:
            for when in ("before", "after"):
                out.append(Schedule(backend, Point(lane=lane, index=op.index, when=when)))
    return out


def b_points() -> list[Point]:
    """Where B pauses for C: its manifests, its deletes, its lease checks on the save path."""
    return [
        Point(method=r"commit_file|create_file", path=r"manifest\.json$", when="before"),
        Point(method=r"commit_file|create_file", path=r"manifest\.json$", when="after"),
        Point(method="delete_dir", when="before"),
        Point(method="listdir", path=LEASE, when="after", skip=2),
    ]


def a_points() -> list[Point]:
    """A's most telling pause points (for the three-writer and read-error schedules)."""
    return [
        Point(method=r"commit_file|create_file", path=manifest_of(100), when="before"),
        Point(method=r"commit_file|create_file", path=manifest_of(150), when="after"),
        Point(method="delete_dir", path=dir_of(SEED_CRASHED), when="before"),
        Point(method="delete_dir", when="before", skip=1),
    ]


def read_error_schedules(backend: str) -> list[Schedule]:
    """Lease reads and listings failing: B's while it takes over, A's on its save path."""
    out = []
    for point in a_points()[:2]:
        for times in (1, 3):
            out.append(Schedule(backend, point, b_faults=[Fault(Point(method="read_file", path=LEASE), times)]))
        out.append(Schedule(backend, point, b_faults=[Fault(Point(method="listdir", path=LEASE), 1)]))
    # A's lease listing fails mid-save (its save fails, not fenced), and A stops at its next delete.
    for skip in (1, 3, 5):
        out.append(
            Schedule(
                backend,
                Point(method="delete_dir", when="before"),
                a_faults=[Fault(Point(method="listdir", path=LEASE, skip=skip), 1)],
            )
        )
    return out


def three_writer_schedules(backend: str) -> list[Schedule]:
    return [Schedule(backend, a, b) for a in a_points() for b in b_points()]


def upload_schedules(ops: dict[str, list[Op]], backend: str, stride: int = 1) -> list[Schedule]:
    """The mirror's uploader of A as a party: A's upload thread pauses at each of its operations."""
    return enumerate_a(ops, backend, lanes=("upload",), stride=stride)
