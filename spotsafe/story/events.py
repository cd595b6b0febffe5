"""The run's story, kept in the store: small immutable event objects under ``events/``.

Every launch of a :class:`spotsafe.Run` records what happened to it (launch, restore,
checkpoints, notices, exit, sampled step metrics, images) through an
:class:`EventLog`. The log buffers events in memory and a named daemon thread writes
them, every ``flush_every`` seconds and at once for the few that matter (a notice,
an exit), as one new object per batch::

    <store>/events/20261201T170640123Z-1a2b3c4d-000007.json
                   └── launch id (time + random) ┘ └ seq ┘

Names are unique and never rewritten: nothing is appended to (S3 has no append) and
two launches, or two copies of one, never write the same object. The step
directories (``step-NNNNNNNNNNNN/``) are the checkpointer's; ``events/`` and
``media/`` are ignored by every checkpoint reader, retention and ``spotsafe ls``.

Reading (:func:`read_events`) only lists and reads: it never takes a writer's lease
and works from any machine that can read the store, or from a copy of it.

The training thread's share of the cost is an ``append`` to a deque and, for the
step metrics, a comparison: the metrics of a step are kept for about a thousand
steps, then every 2nd, 4th, ... step (so a run of a million steps keeps ~6,000
points), and at least once a minute; whatever step the run has reached when a
batch is written is recorded too, so a launch killed with ``kill -9`` is known to
have reached its last step to within ``flush_every`` seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from spotsafe.cloud.aws.metadata import AWSMetadata
from spotsafe.errors import CheckpointCorrupt, FormatVersionError, MetadataError, SpotsafeError
from spotsafe.settings import Settings
from spotsafe.storage.base import Store
from spotsafe.story.validate import MAX_EVENTS_OBJECT_BYTES, Invalid, check_event

__all__ = [
    "EVENTS_DIR",
    "MEDIA_DIR",
    "EventLog",
    "EventReader",
    "new_launch_id",
    "read_events",
]

log = logging.getLogger(__name__)

#: Where event objects live in a store.
EVENTS_DIR = "events"
#: Where images (sample grids) live in a store.
MEDIA_DIR = "media"
EVENTS_FORMAT = "spotsafe-events"
EVENTS_FORMAT_VERSION = 1
#: Seconds between two writes of buffered events (important events are written at once).
DEFAULT_FLUSH_EVERY = 10.0
#: Every step's metrics are kept up to this step; past it every 2nd, 4th, ... step.
DENSE_STEPS = 1000
#: A step's metrics are kept at least this often (seconds), whatever the stride.
POINT_EVERY_SECONDS = 60.0
#: At most this many events go into one object (a reader refuses objects over 16 MiB).
MAX_EVENTS_PER_OBJECT = 20_000

_OBJECT = re.compile(r"^(?P<launch>\d{8}T\d{9}Z-[0-9a-f]{8})(?:-r(?P<rank>\d{4}))?-(?P<seq>\d{6})\.json$")
#: What a rank other than 0 records (in objects of its own, ``<launch>-rNNNN-<seq>.json``).
RANK_KINDS = ("notice", "durable", "checkpoint")


def new_launch_id(now: float | None = None) -> str:
    """A unique, time-ordered id for one launch: ``20261201T170640123Z-1a2b3c4d``."""
    t = time.time() if now is None else now
    dt = datetime.fromtimestamp(t, timezone.utc)
    return f"{dt:%Y%m%dT%H%M%S}{dt.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"


def stride(step: int) -> int:
    """Keep the metrics of every ``stride(step)``-th step: 1 up to DENSE_STEPS, then doubling."""
    return 1 << (max(step, 0) // DENSE_STEPS).bit_length()


def process_start_time() -> float | None:
    """When this process started (UNIX seconds), where the OS says (Linux ``/proc``), to a clock tick.

    ``/proc/self/stat`` gives the start in clock ticks since boot; the boot's wall-clock time is
    taken from the boot clock now (``CLOCK_BOOTTIME``, the clock those ticks count on), not from
    ``/proc/stat``'s ``btime``, which is whole seconds: it put the start up to a second early, before
    the previous launch's exit in a rehearsal's facts.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: field 22, counted after the command name
        booted = _boot_time()
        return booted + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _boot_time() -> float:
    """The wall-clock time of boot: ``time.time()`` less the boot clock, read close together.

    The two reads are a pair only if nothing ran between them: a thread descheduled there (a
    loaded machine) would date the boot that much too early. The pair read fastest of three is
    kept, its boot clock the mean of the readings taken either side of the wall clock.
    """
    pairs = []
    for _ in range(3):
        a = time.clock_gettime(time.CLOCK_BOOTTIME)
        wall = time.time()
        b = time.clock_gettime(time.CLOCK_BOOTTIME)
        pairs.append((b - a, wall - (a + b) / 2))
    return min(pairs)[1]


def _plain(value: Any) -> Any:
    """A metric value as JSON: tensors (converted here, off the training thread) and numbers."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "numel", lambda: 0)() == 1:
        value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; the report reads them back
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return None


def _json_default(value: Any) -> Any:
    return _plain(value)  # a number, or null for what is not one (never a tensor's repr)


def png_bytes(image: Any) -> bytes:
    """PNG bytes of ``image``: PNG bytes as they are, or a tensor (``HW``, ``CHW`` with 1/3/4 channels, in [0, 1])."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("image bytes must be a PNG (they do not start with the PNG signature)")
        return data
    import torch

    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be PNG bytes or a tensor, not {type(image).__name__}")
    t = image.detach().to("cpu", torch.float32)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"image tensor must be HW or CHW with 1, 3 or 4 channels, not shape {tuple(image.shape)}")
    channels, height, width = t.shape
    pixels = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    rows = pixels.reshape(height, width * channels)
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1).numpy().tobytes()  # filter 0 per row
    color = {1: 0, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, color, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


class EventLog:
    """Records one launch's events and writes them to ``store`` in the background.

    :meth:`record` and :meth:`step` only touch memory; a daemon thread writes a new
    object every ``flush_every`` seconds (and soon after :meth:`record` with
    ``urgent=True``). :meth:`flush` writes what is buffered now, on the caller's
    thread; :meth:`close` writes the rest and stops the thread. A failed write is
    logged and retried with the next batch; it never reaches the training loop.
    ``enabled=False`` gives a log that records nothing; with ``rank`` > 0 it records only
    that rank's own view (:data:`RANK_KINDS`: its notice, durable and checkpoint stall and
    persist) in objects named ``<launch>-rNNNN-<seq>.json``, which readers before these
    were written ignore.
    """

    def __init__(
        self,
        store: Store,
        *,
        launch: str | None = None,
        flush_every: float = DEFAULT_FLUSH_EVERY,
        enabled: bool = True,
        rank: int = 0,
    ) -> None:
        if flush_every <= 0:
            raise ValueError(f"flush_every must be > 0 seconds, not {flush_every!r}")
        self.store = store
        self.launch = launch or new_launch_id()
        self.flush_every = float(flush_every)
        self.enabled = enabled
        #: The rank whose view a rank-only log records (0: the full log, or none).
        self.rank = rank if not enabled else 0
        self._records = enabled or self.rank > 0
        #: The status of the exit recorded, once one is.
        self.exit_status: str | None = None
        self._queue: deque[dict[str, Any]] = deque()
        self._files: deque[tuple[str, bytes]] = deque()
        self._seq = 0
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._failing = False
        # step sampling (training thread only)
        self._step = 0
        self._step_time = 0.0
        self._next_point = 0
        self._last_point = -math.inf
        self._recorded_step = 0
        self._first_step = True
        # checkpoints whose background persist has not been seen finishing yet
        self._pending_saves: dict[int, dict[str, Any]] = {}
        self._saves_lock = threading.Lock()
        self._saves_source: Callable[[], tuple[int | None, Mapping[str, float], int | None] | None] | None = None
        self._thread: threading.Thread | None = None
        if self._records:
            self._thread = threading.Thread(target=self._loop, name=f"spotsafe-events({store.url})", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"EventLog({self.store.url!r}, launch={self.launch!r})"

    # -- recording (training thread) ---------------------------------------------

    def record(self, kind: str, *, urgent: bool = False, **fields: Any) -> None:
        """Buffer one event (``kind`` and ``fields``, stamped with the time); ``urgent`` writes it soon."""
        if not self._records or (not self.enabled and kind not in RANK_KINDS):
            return
        self._queue.append({"kind": kind, "time": time.time(), **fields})
        if kind == "exit":
            self.exit_status = str(fields.get("status"))
        if urgent:
            self._wake.set()

    def step(self, step: int, metrics: Mapping[str, Any] | None = None, epoch: int | None = None) -> None:
        """Note that ``step`` was taken; keep its metrics when it is a sampled step (cheap)."""
        if not self.enabled:
            return
        now = time.time()
        self._step = step
        self._step_time = now
        if step < self._next_point and now - self._last_point < POINT_EVERY_SECONDS and not self._first_step:
            return
        # tensors are converted to numbers by the writer thread, not here (no device sync in the loop)
        self._queue.append(
            {
                "kind": "step",
                "time": now,
                "step": step,
                "epoch": epoch,
                "metrics": {k: getattr(v, "detach", lambda v=v: v)() for k, v in (metrics or {}).items()},
                **({"first": True} if self._first_step else {}),
            }
        )
        self._first_step = False
        self._recorded_step = step
        self._last_point = now
        s = stride(step)
        self._next_point = (step // s + 1) * s

    def before_save(self) -> None:
        """Call before a save starts: the previous one has finished, so its persist time is known now."""
        if self._records:
            self._collect_saves()

    def checkpoint(self, step: int, *, epoch: int | None, reason: str, stall_s: float) -> None:
        """A save of ``step`` started (``stall_s``: the time the loop was blocked)."""
        if not self._records:
            return
        record = {"step": step, "epoch": epoch, "reason": reason, "stall_s": round(stall_s, 6), "started": time.time()}
        with self._saves_lock:
            self._pending_saves[step] = record
        if reason != "periodic":
            self._wake.set()

    def watch_saves(self, source: Callable[[], tuple[int | None, Mapping[str, float], int | None] | None]) -> None:
        """``source()`` gives (step, timings, bytes) of the last save that finished, or None.

        A step of None: the oldest save still pending finished (a rank that does not commit
        learns only that its own files are written); bytes None: not known.
        """
        self._saves_source = source

    def record_identity(self) -> None:
        """Record where this launch runs (:func:`launch_identity`) from a daemon thread: no wait at start."""
        if not self.enabled:
            return

        def identify() -> None:
            try:
                self.record("instance", urgent=True, **launch_identity())
            except Exception as e:  # noqa: BLE001 - the identity is a nicety; training must not care
                log.debug("spotsafe events: no instance identity: %s", e)

        threading.Thread(target=identify, name="spotsafe-events-identity", daemon=True).start()

    def put_file(self, path: str, data: bytes) -> None:
        """Write a small file (an image) into the store from the writer thread."""
        if self.enabled:
            self._files.append((path, data))
            self._wake.set()

    # -- writing (writer thread, or flush/close) -----------------------------------

    def _collect_saves(self) -> None:
        with self._saves_lock:
            self._collect_saves_locked()

    def _collect_saves_locked(self) -> None:
        source = self._saves_source
        if source is None or not self._pending_saves:
            return
        try:
            done = source()
        except Exception as e:  # noqa: BLE001 - a probe of the checkpointer must never stop the log
            log.debug("spotsafe events: could not read the last save's timings: %s", e)
            return
        if done is None:
            return
        step, timings, nbytes = done
        if step is None:
            step = min(self._pending_saves)
        for pending in sorted(self._pending_saves):
            if pending > step:
                break
            record = self._pending_saves.pop(pending)
            fields: dict[str, Any] = dict(record)
            if pending == step:
                persist = float(timings.get("write_s", 0.0)) + float(timings.get("commit_s", 0.0))
                fields.update(persist_s=round(persist, 6), durable=True)
                if nbytes is not None:
                    fields["bytes"] = int(nbytes)
            self._queue.append({"kind": "checkpoint", "time": record["started"], **fields})

    def _batch(self) -> list[dict[str, Any]]:
        self._collect_saves()
        batch: list[dict[str, Any]] = []
        while len(batch) < MAX_EVENTS_PER_OBJECT:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                break
        if self._step > self._recorded_step:  # where the run is now, sampled or not
            batch.append({"kind": "progress", "time": self._step_time, "step": self._step})
            self._recorded_step = self._step
        return batch

    def _write(self) -> bool:
        """Write what is buffered as new objects (files first). True when nothing is left unwritten."""
        with self._write_lock:
            ok = True
            while self._files:
                path, data = self._files[0]
                try:
                    self.store.commit_file(path, data)
                except Exception as e:  # noqa: BLE001 - retried with the next batch; training goes on
                    log.warning("spotsafe events: could not write %s/%s: %s", self.store.url, path, e)
                    ok = False
                    break
                self._files.popleft()
            return self._write_events() and ok

    def _write_events(self) -> bool:
        """Write one object of buffered events (and the next while more are buffered)."""
        batch = self._batch()
        if not batch:
            return True
        name = f"{EVENTS_DIR}/{self.launch}{f'-r{self.rank:04d}' if self.rank else ''}-{self._seq:06d}.json"
        doc = {
            "format": EVENTS_FORMAT,
            "format_version": EVENTS_FORMAT_VERSION,
            "launch": self.launch,
            "seq": self._seq,
            "events": batch,
        }
        try:
            data = json.dumps(doc, default=_json_default, separators=(",", ":")).encode()
            self.store.commit_file(name, data)
        except Exception as e:  # noqa: BLE001 - kept and retried with the next batch; training goes on
            if not self._failing:
                log.warning("spotsafe events: could not write %s/%s (will retry): %s", self.store.url, name, e)
            self._failing = True
            self._queue.extendleft(reversed([ev for ev in batch if ev["kind"] != "progress"]))
            if batch[-1]["kind"] == "progress":
                self._recorded_step = 0  # the next batch records where the run is then
            return False
        self._failing = False
        self._seq += 1
        if self._queue:  # more than one object's worth was buffered: the rest in the next ones
            return self._write_events()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._write()

    def flush(self) -> bool:
        """Write everything buffered now (on this thread). True when it all reached the store."""
        if not self._records:
            return True
        return self._write()

    def abandon(self) -> None:
        """Stop recording and write nothing more, not even what is buffered: the store is another writer's now.

        What a fenced run calls (a newer writer generation owns the store): its story goes on
        in the events file only.
        """
        self.enabled = False
        self._records = False  # a rank-only log too: nothing recorded, nothing written by close()
        with self._write_lock:  # a write in flight finishes; nothing after it
            self._queue.clear()
            self._files.clear()
        self.close()

    def close(self) -> None:
        """Write what is left and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self._records:
            self._write()


# -- reading ----------------------------------------------------------------------


#: Problems listed per damaged object, at most (then how many more).
_PROBLEMS_PER_OBJECT = 5


def _parse(name: str, data: bytes | memoryview, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The good events of one object, and what was wrong with the others (CheckpointCorrupt: none usable)."""
    try:
        doc = json.loads(bytes(data))
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise CheckpointCorrupt(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(doc, dict) or doc.get("format") != EVENTS_FORMAT:
        raise CheckpointCorrupt(f"{where}: not a spotsafe events object")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointCorrupt(f"{where}: 'format_version' is not an integer")
    if version > EVENTS_FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: events format version {version!r} is newer than supported ({EVENTS_FORMAT_VERSION})"
        )
    events = doc.get("events")
    if not isinstance(events, list):
        raise CheckpointCorrupt(f"{where}: 'events' is not a list")
    m = _OBJECT.match(name)
    launch, seq = (m.group("launch"), int(m.group("seq"))) if m else ("?", 0)
    rank = int(m.group("rank")) if m and m.group("rank") else 0  # from the name: an event cannot claim a rank
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    skip = _denser_than_kept(events)
    for i, event in enumerate(events):
        if i in skip:
            continue
        try:
            checked = check_event(event)
        except Invalid as why:
            kind = event.get("kind") if isinstance(event, dict) else None
            bad.append(f"event {i} ({kind[:64] if isinstance(kind, str) else '?'}): {why}")
            continue
        if rank and checked["kind"] not in RANK_KINDS:
            bad.append(f"event {i} ({checked['kind'][:64]}): not a kind rank {rank} records")
            continue
        checked.pop("rank", None)
        checked.update(launch=launch, seq=seq, index=i)  # in place: the parsed dict is ours (no copy per event)
        if rank:
            checked["rank"] = rank
        good.append(checked)
    return good, bad


#: An object with more step events than this holds steps denser than the writer keeps them.
DENSE_OBJECT_STEPS = 5000


def _denser_than_kept(events: Sequence[Any]) -> set[int]:
    """Step events to leave out of an object that holds every step (a store written by another tool).

    Kept as spotsafe's writer keeps them (:func:`stride`), and always the first-of-launch,
    the object's first and last step event and its furthest step: the facts come out as
    from a store spotsafe wrote, at a fraction of the memory and time. Objects of up to
    :data:`DENSE_OBJECT_STEPS` step events are read whole.
    """
    steps = [
        (i, e["step"])
        for i, e in enumerate(events)
        if isinstance(e, dict) and e.get("kind") == "step" and type(e.get("step")) is int and not e.get("first")
    ]
    if len(steps) <= DENSE_OBJECT_STEPS:
        return set()
    keep = {steps[0][0], steps[-1][0], max(steps, key=lambda p: p[1])[0]}
    return {i for i, step in steps if step >= 0 and step % stride(step) != 0 and i not in keep}


def _problem(bad: Sequence[str]) -> str:
    shown = "; ".join(bad[:_PROBLEMS_PER_OBJECT])
    more = len(bad) - _PROBLEMS_PER_OBJECT
    return f"{shown}; and {more} more event(s) skipped" if more > 0 else shown


class EventReader:
    """Reads a store's events; objects already read are kept (they never change).

    :meth:`read` lists ``events/`` (names and sizes, one listing) and reads only the
    objects it has not seen, in parallel. Never takes a lease, never writes. An object
    that cannot be read or parsed, or is larger than
    :data:`~spotsafe.story.validate.MAX_EVENTS_OBJECT_BYTES`, is skipped; an event that
    fails :func:`~spotsafe.story.validate.check_event` is dropped; both are named in
    :attr:`problems` (object name → why). Only a newer format version raises.
    """

    def __init__(self, store: Store, *, parallel: int = 16) -> None:
        self.store = store
        self.parallel = parallel
        self._cache: dict[str, list[dict[str, Any]]] = {}
        #: Objects that could not be read, or held events that were dropped, with why.
        self.problems: dict[str, str] = {}

    def _load(self, name: str, size: int | None) -> tuple[list[dict[str, Any]] | None, str | None]:
        where = f"{self.store.url.rstrip('/')}/{EVENTS_DIR}/{name}"
        if size is None:
            return None, "not a regular file inside the store; not read"
        if size > MAX_EVENTS_OBJECT_BYTES:
            return [], f"{size} bytes, more than an events object may hold ({MAX_EVENTS_OBJECT_BYTES}); not read"
        try:
            data = self.store.read_file(f"{EVENTS_DIR}/{name}")
            if len(data) > MAX_EVENTS_OBJECT_BYTES:
                return [], f"{len(data)} bytes, more than an events object may hold; not read"
            good, bad = _parse(name, data, where)
        except FormatVersionError:
            raise
        except CheckpointCorrupt as e:  # its content: the same next time
            return [], str(e)
        except (SpotsafeError, OSError, ValueError) as e:  # reading it: tried again next time
            return None, str(e)
        return good, _problem(bad) if bad else None

    def read(self) -> list[dict[str, Any]]:
        """Every good event in the store, in time order (then launch, object and position)."""
        names = sorted(n for n in self.store.listdir(EVENTS_DIR) if _OBJECT.match(n))
        todo = [n for n in names if n not in self._cache]  # a damaged one is kept as empty: read once
        if todo:
            sizes = self.store.file_sizes(EVENTS_DIR)

            def load(name: str) -> tuple[str, tuple[list[dict[str, Any]] | None, str | None]]:
                return name, self._load(name, sizes.get(name))

            results: Iterable[tuple[str, tuple[list[dict[str, Any]] | None, str | None]]]
            if len(todo) > 1 and self.parallel > 1:
                with ThreadPoolExecutor(min(self.parallel, len(todo)), thread_name_prefix="spotsafe-events-read") as ex:
                    results = list(ex.map(load, todo))
            else:
                results = [load(n) for n in todo]
            for name, (got, why) in results:
                if why is not None:
                    if name not in self.problems:
                        log.warning("spotsafe events: %s: %s", name, why)
                    self.problems[name] = why
                else:
                    self.problems.pop(name, None)
                if got is not None:
                    self._cache[name] = got
        events = [e for n in names for e in self._cache.get(n, [])]
        events.sort(key=lambda e: (float(e["time"]), e["launch"], e.get("rank", 0), e["seq"], e["index"]))
        return events


def read_events(store: Store) -> list[dict[str, Any]]:
    """Every event recorded in ``store``, in time order. Reads only; never takes a lease."""
    return EventReader(store).read()


def launch_identity(timeout: float = 0.5) -> dict[str, Any]:
    """Where this process runs: host name, and on EC2 the instance id, type, zone and market.

    Asks the instance metadata service only when the AWS source is not turned off
    (``AWS_EC2_METADATA_DISABLED``, ``SPOTSAFE_SOURCES`` without ``aws``); off the cloud
    the probe fails within ``timeout``.
    """
    info: dict[str, Any] = {"host": socket.gethostname()}
    settings = Settings.from_env()
    sources = [s.strip() for s in (settings.sources or "").split(",") if s.strip()]
    if settings.aws_disabled or (sources and "aws" not in sources and "auto" not in sources):
        return info
    imds = AWSMetadata(timeout=timeout)
    try:
        if not imds.probe(timeout=timeout):
            return info
        doc = imds.identity
        info.update(
            cloud="aws",
            instance_id=doc.get("instanceId"),
            instance_type=doc.get("instanceType"),
            zone=doc.get("availabilityZone"),
            region=doc.get("region"),
        )
        market = imds.get_text("/latest/meta-data/instance-life-cycle", timeout=timeout)
        if market:
            info["market"] = market.strip()  # "spot" | "on-demand" | "scheduled"
    except (MetadataError, OSError, ValueError) as e:
        log.debug("spotsafe events: no instance identity: %s", e)
    finally:
        imds.close()
    return info


def describe(events: Sequence[Mapping[str, Any]]) -> str:
    """One line per event, for logs and debugging."""
    return "\n".join(
        f"{e.get('launch', '?')} {e.get('time', 0):.3f} {e.get('kind')} "
        + json.dumps({k: v for k, v in e.items() if k not in ("launch", "seq", "index", "time", "kind")}, default=str)
        for e in events
    )
