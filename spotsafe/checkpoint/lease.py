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
  wall clock, or when the holder is a dead process on this very machine.
- A writer of generation *g* is superseded as soon as ``gen-(g+1)`` exists. Before
  each commit (and again after it) the checkpointer checks that file's absence and
  that its own lease is still valid by its own boot clock; a superseded writer's
  save raises :class:`~spotsafe.errors.WriterFenced` and never publishes a manifest.
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

from spotsafe.errors import CheckpointNotFound, LeaseTimeout, SpotsafeError, WriterFenced
from spotsafe.processes import boot_id, pid_alive, process_start
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


def read_record(store: Store, generation: int) -> LeaseRecord | None:
    """The record of ``generation``, or None when there is none."""
    try:
        data = store.read_file(lease_path(generation))
    except CheckpointNotFound:
        return None
    return LeaseRecord.from_json(data, f"{store.url.rstrip('/')}/{lease_path(generation)}")


def takeovers(store: Store, since: int) -> list[tuple[int, int]]:
    """``(generation, base_step)`` of every generation above ``since`` that recorded its base step."""
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
        self._last_log = 0.0

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
        tops: list[tuple[Store, int, LeaseRecord | None]] = []
        for tier in self.tiers:
            gens = generations(tier)
            top = gens[-1] if gens else 0
            try:
                record = read_record(tier, top) if top else None
            except SpotsafeError as e:
                log.warning("spotsafe: %s; treating it as expired", e)
                record = None
            tops.append((tier, top, record))
        for tier, _top, record in tops:
            if record is not None and not self._free(tier, record):
                return None
        generation = max(top for _, top, _ in tops) + 1
        now = datetime.now(timezone.utc)
        record = LeaseRecord(
            generation=generation,
            host=socket.gethostname(),
            pid=os.getpid(),
            boot_id=boot_id(),
            process_start=process_start(os.getpid()),
            token=self._token,
            acquired=now,
            renewed=now,
            lease_seconds=self.seconds,
        )
        started = _boot_clock()
        created: list[Store] = []
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
        with _HELD_LOCK:
            for tier in self.tiers:
                _HELD[(tier.url, generation)] = self
        log.info("spotsafe: writer lease of %s taken: generation %d", self.store.url, generation)
        return generation

    def _free(self, tier: Store, record: LeaseRecord) -> bool:
        """True when the holder of ``record`` is gone: released, dead, or silent for a lease period."""
        if record.released:
            return True
        now = datetime.now(timezone.utc)
        if now > record.expires + timedelta(seconds=record.lease_seconds):
            return True  # stale even allowing a lease period of clock skew
        same_machine = record.boot_id and record.boot_id == boot_id()
        if same_machine and record.pid == os.getpid():
            with _HELD_LOCK:
                holder = _HELD.get((tier.url, record.generation))
            if holder is None or not holder.held:
                return True  # an object of this process that is gone or superseded
            log.warning(
                "spotsafe: another writer in this process holds %s (generation %d); taking it over",
                tier.url,
                record.generation,
            )
            return True
        if same_machine and not pid_alive(record.pid, record.process_start):
            return True
        # Silent for a whole lease period on this process's own clock: no skew involved.
        key = (tier.url, record.generation)
        state = (record.renewals, record.renewed, record.released)
        seen = self._seen.get(key)
        clock = time.monotonic()
        if seen is None or seen[0] != state:
            self._seen[key] = (state, clock)
            seen = self._seen[key]
        silent = clock - seen[1]
        if silent >= record.lease_seconds:
            return True
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
        return False

    # -- holding ----------------------------------------------------------------
    def _write_all(self) -> None:
        """Write this generation's record on every tier (a renewal or the base step)."""
        with self._lock:
            record = self.record
        assert record is not None and self.generation is not None
        for tier in self.tiers:
            tier.commit_file(lease_path(self.generation), record.to_json())

    def _superseded(self, tier: Store) -> bool:
        assert self.generation is not None
        return tier.file_size(lease_path(self.generation + 1)) is not None

    def _fence(self, tier: Store) -> WriterFenced:
        error = WriterFenced(
            f"{tier.url}: this writer (generation {self.generation}) was superseded by generation "
            f"{(self.generation or 0) + 1}: another instance owns the store now; nothing more is committed here"
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
            if self._superseded(tier):
                raise self._fence(tier)
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
        if self._superseded(self.primary):
            raise self._fence(self.primary)
        margin = max(MIN_MARGIN, self.seconds / 10)
        if _boot_clock() > self._valid_until - margin:
            self.renew()

    def _check_remote(self) -> None:
        """A mirror's upload thread asks this before committing a manifest on the remote tier."""
        if self.generation is None:
            return  # never took the lease (a reader's mirror): nothing to fence
        if self._fenced is not None:
            raise self._fenced
        if self._superseded(self.tiers[0]):
            raise self._fence(self.tiers[0])

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
                if tier.file_size(lease_path(generation + 1)) is None:
                    tier.commit_file(lease_path(generation), released)
            except Exception as e:  # noqa: BLE001 - the lease then expires on its own
                log.warning("spotsafe: releasing the writer lease of %s failed: %s", tier.url, e)
        log.info("spotsafe: writer lease of %s released (generation %d)", self.store.url, generation)
