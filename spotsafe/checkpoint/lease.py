"""Writer fencing: one writer per store at a time, through a lease with a generation.

Spot fleets overlap: a capacity-rebalance replacement starts before the old
instance is gone, a stopped instance comes back after its replacement took over, a
partitioned one keeps training. All of them open the same store. The lease makes
that safe:

- The store holds one small file per *generation*: ``lease/gen-000000000007.json``.
  The highest generation is the current writer. Taking the store over is creating
  the next generation's file *exclusively* (local: temp file + ``link``, which fails
  with EEXIST; S3: a PUT with ``If-None-Match: *``): of several instances racing,
  exactly one wins.
- A writer may take over when the holder released the store (close, ``finish``,
  exit 75) or stopped renewing it for ``SPOTSAFE_LEASE_SECONDS``. The holder renews
  every third of that in a background thread. "Stopped renewing" is judged on the
  taker's own clock (the file unchanged for a whole lease period since it first
  looked), or at once when the record is stale by more than a lease period on the
  wall clock, or when the holder is a dead process on this very machine. Only a
  record that was read can say so: a failed read (an S3 500 after the retries, EIO or
  ESTALE on NFS, a timeout) means wait and look again, logged once per lease period.
  A record listed but missing, or unparseable (torn), counts as silent once it stayed
  so, unchanged, for a whole lease period on the taker's clock.
- A writer of generation *g* is superseded as soon as any generation above *g*
  exists (not only ``gen-(g+1)``: a mirror whose tiers disagreed may skip one).
  Before each commit (and again after it) the checkpointer lists ``lease/`` for one
  and checks that its own lease is still valid by its own boot clock; a superseded
  writer's save raises :class:`~spotsafe.errors.WriterFenced` and never publishes a manifest.
- The check-then-commit window is closed for readers by the *ghost rule*: every
  manifest records its writer's generation, and each new generation records the
  newest step it saw when it took over (``base_step``). A manifest of generation *h*
  with a step above the ``base_step`` of a later generation was committed by a
  superseded writer after the takeover: readers skip it and the new writer removes it.

Readers (``ls``, ``verify``, ``latest``, ``load``) never take the lease. See
docs/design.md ("Many instances, one store") and docs/storage.md for what each store
guarantees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from spotsafe.errors import CheckpointNotFound, LeaseTimeout, SpotsafeError, StoreError, WriterFenced
from spotsafe.processes import boot_id, pid_alive, pid_namespace, process_start
from spotsafe.settings import Settings
from spotsafe.storage.base import Store

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
FORMAT = "spotsafe-lease"
FORMAT_VERSION = 1
#: The manifest metadata key that records the writer's generation.
GENERATION_KEY = "spotsafe_generation"
_NAME = re.compile(r"^gen-(\d{12})\.json$")
#: How long the holder keeps clear of its own lease's end before committing: a commit
#: started later could land after a replacement took over.
MIN_MARGIN = 1.0


def lease_path(generation: int) -> str:
    """The file of ``generation`` in the store."""
    return f"{LEASE_DIR}/gen-{generation:012d}.json"


def _boot_clock() -> float:
    """Seconds on a clock that keeps counting while the process is stopped or the machine suspended."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


@dataclass(frozen=True)
class LeaseRecord:
    """What ``lease/gen-N.json`` says about its holder."""

    generation: int
    host: str
    pid: int
    boot_id: str
    process_start: str
    token: str  # tells this holder's objects apart within one process
    acquired: datetime
    renewed: datetime
    lease_seconds: float
    renewals: int = 0
    released: bool = False
    #: The newest committed step this generation saw right after taking over (None: none
    #: yet known; -1: the store was empty). Readers use it to tell ghosts (see the module doc).
    base_step: int | None = None
    #: The holder's pid namespace (:func:`spotsafe.processes.pid_namespace`): its pid is
    #: looked up only by a taker in the same boot and namespace ("": unknown, never looked up).
    pid_namespace: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def expires(self) -> datetime:
        return self.renewed + timedelta(seconds=self.lease_seconds)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["acquired"] = self.acquired.isoformat()
        d["renewed"] = self.renewed.isoformat()
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | memoryview, where: str) -> LeaseRecord:
        try:
            d = json.loads(bytes(data))
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError("not a spotsafe lease")
            if d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unknown lease format version {d.get('format_version')!r}")
            d["acquired"] = datetime.fromisoformat(d["acquired"])
            d["renewed"] = datetime.fromisoformat(d["renewed"])
            record = cls(**d)
            if not isinstance(record.generation, int) or record.generation < 1:
                raise ValueError(f"bad generation {record.generation!r}")
        except (ValueError, TypeError, KeyError) as e:
            raise SpotsafeError(f"{where}: unreadable writer lease ({e})") from e
        return record


def generations(store: Store) -> list[int]:
    """The lease generations present in ``store``, ascending (readers may call it: it takes nothing)."""
    return sorted(int(m.group(1)) for m in map(_NAME.match, store.listdir(LEASE_DIR)) if m)


def _above(store: Store, generation: int) -> int | None:
    """The newest generation above ``generation`` in ``store``, or None."""
    gens = generations(store)
    return gens[-1] if gens and gens[-1] > generation else None


def read_record(store: Store, generation: int) -> LeaseRecord | None:
    """The record of ``generation``, or None when there is none."""
    try:
        data = store.read_file(lease_path(generation))
    except CheckpointNotFound:
        return None
    return LeaseRecord.from_json(data, f"{store.url.rstrip('/')}/{lease_path(generation)}")


def takeovers(store: Store, since: int) -> list[tuple[int, int]]:
    """``(generation, base_step)`` of every generation above ``since`` that recorded its base step.

    Read from the store's shared tier (a mirror's remote: every takeover through a mirror creates
    its generation there first), so a volume that carries lease records of an earlier, separate
    history cannot make the shared history's checkpoints look like ghosts. Where the shared tier
    cannot be read, every tier's records are used (logged).
    """
    shared = store.tiers[-1]
    if shared is not store:
        try:
            return _takeovers(shared, since)
        except SpotsafeError as e:
            log.warning("spotsafe: cannot read the writer leases of %s; using every tier's: %s", shared.url, e)
    return _takeovers(store, since)


def _takeovers(store: Store, since: int) -> list[tuple[int, int]]:
    out = []
    for g in generations(store):
        if g <= since:
            continue
        try:
            record = read_record(store, g)
        except SpotsafeError as e:
            log.warning("spotsafe: %s", e)
            continue
        if record is not None and record.base_step is not None:
            out.append((g, record.base_step))
    return out


def is_ghost(generation: int | None, step: int, later: Sequence[tuple[int, int]]) -> bool:
    """True when a manifest of ``generation`` at ``step`` was committed after a later writer took over."""
    if generation is None:
        return False
    return any(g > generation and step > base for g, base in later)


#: Stores whose exclusive create was checked in this process (once per store object).
_PROBED: weakref.WeakSet[Store] = weakref.WeakSet()


def probe_exclusive_create(store: Store) -> None:
    """Refuse a store whose ``create_file`` is not exclusive: a second create of one path must say False.

    Backends that check their server themselves (``Store.verifies_exclusive_create``: S3's
    conditional-write probe) are trusted; any other store is asked once per store object,
    before its first takeover, with a probe file under ``lease/`` that is removed again. A
    store whose second create succeeds would let two writers hold one generation and both
    commit: it is refused with a :class:`~spotsafe.errors.StoreError` naming it.
    """
    if store.verifies_exclusive_create or store in _PROBED:
        return
    directory = f"{LEASE_DIR}/.probe-{os.urandom(6).hex()}"
    try:
        first = store.create_file(f"{directory}/probe", b"spotsafe exclusive-create probe")
        second = store.create_file(f"{directory}/probe", b"spotsafe exclusive-create probe, again")
    finally:
        try:
            store.delete_dir(directory)
        except Exception as e:  # noqa: BLE001 - a leftover probe directory harms nothing: logged
            log.warning("spotsafe: could not remove the probe %s/%s: %s", store.url.rstrip("/"), directory, e)
    if not (first and not second):
        raise StoreError(
            f"{store.url}: its create_file is not exclusive (a second create of one new path "
            f"{'succeeded' if second else 'did not fail as it should'}): two writers could both take the writer "
            "lease and both commit. Use a store whose create is atomic and exclusive (docs/storage.md, writer fencing)"
        )
    _PROBED.add(store)


# Leases held by this process, by (store url, generation): a second writer in the same
# process takes over from one that is gone (garbage-collected) at once.
_HELD: weakref.WeakValueDictionary[tuple[str, int], Lease] = weakref.WeakValueDictionary()
_HELD_LOCK = threading.Lock()


class Lease:
    """The writer lease of one store: acquire, renew in the background, check before commits, release.

    ``store`` is the store written to; for a mirror the lease is taken on both tiers
    (the remote first: it is what other instances see; then the local volume, which a
    moved EBS volume carries along), and commits to each tier are checked against that
    tier's lease. ``seconds``: the lease period (default ``SPOTSAFE_LEASE_SECONDS``).
    """

    def __init__(self, store: Store, *, seconds: float | None = None, poll: float | None = None) -> None:
        if seconds is None:
            seconds = Settings.from_env().lease_seconds
        if seconds <= 0:
            raise ValueError(f"lease seconds must be > 0, not {seconds!r}")
        self.store = store
        self.seconds = float(seconds)
        self.poll = poll if poll is not None else min(1.0, self.seconds / 10)
        #: The tier commits go to first (and are checked against on the save path).
        self.primary: Store = store.tiers[0]
        #: Every tier, the last committed to first: a takeover is decided on the remote tier of a mirror.
        self.tiers: list[Store] = list(reversed(store.tiers))
        store.set_fence(self._check_remote)
        self.generation: int | None = None
        self.record: LeaseRecord | None = None
        self._valid_until = 0.0  # boot clock
        self._fenced: WriterFenced | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = os.urandom(6).hex()
        self._seen: dict[tuple[str, int], tuple[tuple[Any, ...], float]] = {}
        self._periods: dict[tuple[str, int], float] = {}  # the lease period each record read named
        self._last_log = 0.0
        self._last_problem: float | None = None
        #: Why this lease could take the store over (each tier's top generation: released,
        #: silent, stale, dead, or none yet); set when taken, for logs and tests.
        self.takeover: str | None = None

    def __repr__(self) -> str:
        return f"Lease({self.store.url!r}, generation={self.generation})"

    @property
    def held(self) -> bool:
        """True while this object holds the store (acquired, not released, not known to be superseded)."""
        return self.generation is not None and self._fenced is None

    # -- acquiring --------------------------------------------------------------
    def acquire(self, base_step: Callable[[], int | None] | None = None, *, timeout: float | None = None) -> int:
        """Take the store over, waiting while a live holder renews it; the new generation.

        ``base_step()`` is called right after the takeover and must return the newest
        committed step now in the store (None: none); it is recorded for the ghost rule.
        ``timeout`` None waits as long as the holder stays alive (it logs why, every 30 s).
        """
        if self.generation is not None:
            self.check()
            return self.generation
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self._try_acquire()
            if got is not None:
                break
            if end is not None and time.monotonic() >= end:
                raise LeaseTimeout(f"{self.store.url}: the writer lease is still held after {timeout:g} s")
            time.sleep(self.poll)
        step = base_step() if base_step is not None else None
        with self._lock:
            assert self.record is not None
            self.record = replace(self.record, base_step=-1 if step is None else int(step))
        self._write_all()
        self._start_renewing()
        return got

    def _try_acquire(self) -> int | None:
        tops: list[int] = []
        reasons: list[str] = []
        for tier in self.tiers:
            gens = generations(tier)
            top = gens[-1] if gens else 0
            tops.append(top)
            reasons.append(self._judge(tier, top) if top else f"{tier.url}: no writer yet")
        if any(not reason for reason in reasons):
            return None  # every tier is judged each time: each tier's silence clock keeps running
        generation = max(tops) + 1
        now = datetime.now(timezone.utc)
        record = LeaseRecord(
            generation=generation,
            host=socket.gethostname(),
            pid=os.getpid(),
            boot_id=boot_id(),
            pid_namespace=pid_namespace(),
            process_start=process_start(os.getpid()),
            token=self._token,
            acquired=now,
            renewed=now,
            lease_seconds=self.seconds,
        )
        started = _boot_clock()
        created: list[Store] = []
        for tier in self.tiers:
            probe_exclusive_create(tier)
        for tier in self.tiers:
            if not tier.create_file(lease_path(generation), record.to_json()):
                log.info("spotsafe: another writer took generation %d of %s first", generation, tier.url)
                for done in created:  # give back what this attempt took on the other tier
                    done.commit_file(lease_path(generation), replace(record, released=True).to_json())
                return None
            created.append(tier)
        with self._lock:
            self.generation = generation
            self.record = record
            self._valid_until = started + self.seconds
            self.takeover = "; ".join(reasons)
        with _HELD_LOCK:
            for tier in self.tiers:
                _HELD[(tier.url, generation)] = self
        log.info("spotsafe: writer lease of %s taken: generation %d (%s)", self.store.url, generation, self.takeover)
        return generation

    def _judge(self, tier: Store, generation: int) -> str:
        """Why ``generation``, the top one on ``tier``, may be taken over; "" while it must be waited for.

        Only a record that was read says its holder is gone. A failed read says nothing (an
        S3 500 after the retries, EIO/ESTALE on NFS, a timeout, a renewal replacing the object
        between its HEAD and GET), nor does a record that cannot be parsed (torn mid-write, or
        cut short on the way): wait and look again. A record listed but missing counts as
        silent once it stayed missing for a whole lease period on this clock (see ``_missing``).
        """
        where = f"{tier.url.rstrip('/')}/{lease_path(generation)}"
        try:
            record = LeaseRecord.from_json(tier.read_file(lease_path(generation)), where)
        except CheckpointNotFound:
            return self._missing(tier, generation)
        except Exception as e:  # noqa: BLE001 - no observation at all: never a reason to take over
            self._problem(tier, generation, f"{e}")
            return ""
        self._periods[(tier.url, generation)] = record.lease_seconds
        return self._free(tier, record)

    def _missing(self, tier: Store, generation: int) -> str:
        """A generation listed whose record is gone: free once it stayed gone for a lease period.

        Waiting for it forever would deadlock the store (a record deleted by hand, a sync
        tool that copied the listing and not the file). A live holder rewrites its record at
        every renewal, a third of a period, so one missing for a whole period on this clock
        is not renewed by anyone; should its writer still live, the new generation fences it.
        The period is the longer of this lease's and the one the record named when last read.
        """
        key = (tier.url, generation)
        period = max(self.seconds, self._periods.get(key, 0.0))
        silent = self._silence(key, ("missing",))
        if silent >= period:
            return (
                f"{tier.url}: generation {generation}: its record listed but missing for {silent:.1f} s on this clock"
            )
        self._problem(tier, generation, f"its record is listed but missing ({silent:.1f} s of {period:g} s)")
        return ""

    def _silence(self, key: tuple[str, int], state: tuple[Any, ...]) -> float:
        """Seconds on this process's clock since ``key`` was first seen in ``state`` (0: it just changed)."""
        clock = time.monotonic()
        seen = self._seen.get(key)
        if seen is None or seen[0] != state:
            self._seen[key] = seen = (state, clock)
        return clock - seen[1]

    def _problem(self, tier: Store, generation: int, what: str) -> None:
        """Log why the holder's record gave no answer: at most once per lease period."""
        clock = time.monotonic()
        if self._last_problem is None or clock - self._last_problem >= self.seconds:
            self._last_problem = clock
            log.warning(
                "spotsafe: %s: cannot tell whether the writer of generation %d still holds the store: %s; "
                "waiting and looking again (an unread lease is never taken for an expired one)",
                tier.url,
                generation,
                what,
            )

    def _free(self, tier: Store, record: LeaseRecord) -> str:
        """Why the holder of ``record`` is gone (released, dead, silent for a lease period); "" while it lives."""
        name = f"{tier.url}: generation {record.generation}"
        if record.released:
            return f"{name}: released"
        now = datetime.now(timezone.utc)
        if now > record.expires + timedelta(seconds=record.lease_seconds):
            # Stale even allowing a lease period of clock skew.
            return f"{name}: renewed {record.renewed.isoformat()}, stale on the wall clock at {now.isoformat()}"
        # Its pid means something here only in the same boot and the same pid namespace: two
        # containers on one node share the boot id, and pid 7 in one is not pid 7 in the other.
        same_machine = bool(record.boot_id) and record.boot_id == boot_id()
        same_machine = same_machine and bool(record.pid_namespace) and record.pid_namespace == pid_namespace()
        if same_machine and record.pid == os.getpid():
            with _HELD_LOCK:
                holder = _HELD.get((tier.url, record.generation))
            if holder is None or not holder.held:
                return f"{name}: held by an object of this process that is gone or superseded"
            log.warning(
                "spotsafe: another writer in this process holds %s (generation %d); taking it over",
                tier.url,
                record.generation,
            )
            return f"{name}: held by another writer of this process"
        if same_machine and not pid_alive(record.pid, record.process_start):
            return f"{name}: its holder, pid {record.pid} on this machine, is dead"
        # Silent for a whole lease period on this process's own clock: no skew involved.
        silent = self._silence((tier.url, record.generation), (record.renewals, record.renewed, record.released))
        if silent >= record.lease_seconds:
            return f"{name}: unchanged for {silent:.1f} s on this clock (lease {record.lease_seconds:g} s)"
        clock = time.monotonic()
        if clock - self._last_log >= 30.0 or self._last_log == 0.0:
            self._last_log = clock
            log.warning(
                "spotsafe: %s is being written by %s (pid %d, generation %d, renewed %s); waiting for it to "
                "release the store (exit 75, finish, close) or to stop renewing for %.0f s (silent %.0f s so far)",
                tier.url,
                record.host,
                record.pid,
                record.generation,
                record.renewed.isoformat(timespec="seconds"),
                record.lease_seconds,
                silent,
            )
        return ""

    # -- holding ----------------------------------------------------------------
    def _write_all(self) -> None:
        """Write this generation's record on every tier (a renewal or the base step)."""
        with self._lock:
            record = self.record
        assert record is not None and self.generation is not None
        for tier in self.tiers:
            tier.commit_file(lease_path(self.generation), record.to_json())

    def _superseded(self, tier: Store) -> int | None:
        """The newest generation above this writer's on ``tier``, or None (one listing of ``lease/``).

        Any generation above g supersedes g, not only g+1: a mirror whose tiers disagreed
        about the top generation lets a takeover skip one.
        """
        assert self.generation is not None
        return _above(tier, self.generation)

    def _fence(self, tier: Store, newer: int) -> WriterFenced:
        error = WriterFenced(
            f"{tier.url}: this writer (generation {self.generation}) was superseded by generation "
            f"{newer}: another instance owns the store now; nothing more is committed here"
        )
        with self._lock:
            if self._fenced is None:
                self._fenced = error
        self._stop.set()
        return error

    def renew(self) -> None:
        """Extend the lease by a period on every tier; raise WriterFenced when superseded."""
        if self.generation is None or self.record is None:
            raise WriterFenced(f"{self.store.url}: this writer holds no lease")
        if self._fenced is not None:
            raise self._fenced
        started = _boot_clock()
        for tier in self.tiers:
            newer = self._superseded(tier)
            if newer is not None:
                raise self._fence(tier, newer)
        with self._lock:
            self.record = replace(self.record, renewed=datetime.now(timezone.utc), renewals=self.record.renewals + 1)
        self._write_all()
        with self._lock:
            self._valid_until = started + self.seconds

    def check(self) -> None:
        """Raise :class:`WriterFenced` unless this writer still holds the store (one look at the primary tier).

        Called right before and right after a manifest is committed. When the lease
        ran out on this process's own clock (the process was stopped, say), it is
        renewed first, which fails when a newer generation exists.
        """
        if self.generation is None:
            raise WriterFenced(f"{self.store.url}: this writer holds no lease (released or never taken)")
        if self._fenced is not None:
            raise self._fenced
        newer = self._superseded(self.primary)
        if newer is not None:
            raise self._fence(self.primary, newer)
        self._check_other_tiers()
        margin = max(MIN_MARGIN, self.seconds / 10)
        if _boot_clock() > self._valid_until - margin:
            self.renew()

    def _check_other_tiers(self) -> None:
        """A mirror's other tiers, looked at too: a takeover seen only on the remote fences this writer.

        A tier that cannot be read now (the network is down during a notice) does not stop a
        save on the local one: the local commit is the durable one, and the upload thread
        checks the remote again before it commits there (logged once per lease period).
        """
        for tier in self.tiers:
            if tier is self.primary:
                continue
            try:
                newer = self._superseded(tier)
            except Exception as e:  # noqa: BLE001 - an unreachable remote never blocks a local commit
                clock = time.monotonic()
                if self._last_problem is None or clock - self._last_problem >= self.seconds:
                    self._last_problem = clock
                    log.warning("spotsafe: cannot look for a newer writer on %s (checked at upload): %s", tier.url, e)
                continue
            if newer is not None:
                raise self._fence(tier, newer)

    def _check_remote(self) -> None:
        """A mirror's upload thread asks this before committing a manifest on the remote tier."""
        if self.generation is None:
            return  # never took the lease (a reader's mirror): nothing to fence
        if self._fenced is not None:
            raise self._fenced
        newer = self._superseded(self.tiers[0])
        if newer is not None:
            raise self._fence(self.tiers[0], newer)

    def _start_renewing(self) -> None:
        ref = weakref.ref(self)
        stop = self._stop
        interval = self.seconds / 3

        def loop() -> None:
            while not stop.wait(interval):
                lease = ref()
                if lease is None:
                    return
                try:
                    lease.renew()
                except WriterFenced as e:
                    log.error("spotsafe: %s", e)
                    return
                except Exception as e:  # noqa: BLE001 - retried at the next interval; check() decides
                    log.warning("spotsafe: renewing the writer lease of %s failed: %s", lease.store.url, e)
                del lease

        self._thread = threading.Thread(target=loop, name=f"spotsafe-lease({self.store.url})", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the store up: a replacement may take over at once. Idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        with self._lock:
            generation, record = self.generation, self.record
            self.generation = None
        if generation is None or record is None:
            return
        with _HELD_LOCK:
            for tier in self.tiers:
                _HELD.pop((tier.url, generation), None)
        if self._fenced is not None:
            return  # the store is someone else's: write nothing
        released = replace(record, released=True, renewed=datetime.now(timezone.utc)).to_json()
        for tier in self.tiers:
            try:
                if _above(tier, generation) is None:
                    tier.commit_file(lease_path(generation), released)
            except Exception as e:  # noqa: BLE001 - the lease then expires on its own
                log.warning("spotsafe: releasing the writer lease of %s failed: %s", tier.url, e)
        log.info("spotsafe: writer lease of %s released (generation %d)", self.store.url, generation)


class Look(threading.Thread):
    """``lease.check()`` on a thread of its own, started early so that the save's own round trips hide it.

    A save starts one before writing its files and waits for it (:meth:`result`) right before
    its manifest is created: a writer already superseded then stops there without committing,
    while the look *after* the commit (``commit_manifest``), which decides whether ``save()``
    returns, stays where it is.
    """

    def __init__(self, lease: Lease) -> None:
        super().__init__(name="spotsafe-lease-look", daemon=True)
        self._lease = lease
        self._error: BaseException | None = None
        self._done = 0.0
        self.start()

    def run(self) -> None:
        try:
            self._lease.check()
        except BaseException as e:  # noqa: BLE001 - handed to the committing thread by result()
            self._error = e
        finally:
            self._done = _boot_clock()

    def result(self) -> None:
        """Wait for the look; raise what it raised (WriterFenced when a newer generation holds the store).

        A look older than a third of the lease period (a long upload; a process stopped
        meanwhile: the boot clock counts that time) is made again, so that a writer woken
        after a takeover stops before committing, as a look right before the commit would.
        """
        self.join()
        if self._error is not None:
            raise self._error
        if _boot_clock() - self._done > self._lease.seconds / 3:
            self._lease.check()
