"""A local store mirrored to a remote one in the background.

What SageMaker does with ``/opt/ml/checkpoints``, with the commit protocol kept on
both tiers:

- every write and commit goes to the *local* store (the fast EBS volume): a save is
  durable the moment its manifest is committed locally, which is what matters
  during a two-minute preemption notice;
- the commit of a manifest queues that checkpoint for upload; a named daemon thread
  uploads its data files, then its manifest, so the remote tier never shows a
  checkpoint before all of its files are there;
- reads consider both tiers (local first), so a fresh instance with an empty local
  disk restores from the remote;
- ``delete_dir`` deletes on both (remote deletes are queued behind the uploads, so
  retention never races an upload);
- a failed upload is logged and retried with backoff; the local copy is never touched.
  Checkpoints committed locally but missing remotely (the instance stopped before the
  upload finished) are queued again by :meth:`MirrorStore.cleanup_incomplete`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from spotsafe.errors import CheckpointNotFound, StoreError, WriterFenced
from spotsafe.storage.base import Buffer, Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Directories of immutable single files (spotsafe.story.events: events/, media/), resynced file by file.
_OWN_FILES = ("events", "media")


@dataclass(frozen=True)
class _Job:
    kind: str  # "upload" (a checkpoint dir, or a top-level file) | "delete" | "resync"
    path: str  # the committed file (upload) or the directory (delete)


class MirrorStore(Store):
    """Commit to ``local``, then copy each committed checkpoint to ``remote`` in the background.

    ``retry_interval`` is the first pause after a failed upload (doubling up to a minute);
    ``close_timeout`` bounds how long :meth:`close` waits for pending uploads
    (None: as long as they make progress).
    """

    def __init__(
        self,
        local: Store,
        remote: Store,
        *,
        retry_interval: float = 1.0,
        close_timeout: float | None = None,
    ):
        self.local = local
        self.remote = remote
        self.url = local.url
        self.retry_interval = retry_interval
        self.close_timeout = close_timeout
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._busy: _Job | None = None
        self._resynced = False
        self._deleting: set[str] = set()  # deleted locally, remote delete still queued
        self._stop = threading.Event()
        self._deadline: datetime | None = None
        self._closed = False
        #: The last background error (kept for inspection; uploads are retried regardless).
        self.last_error: BaseException | None = None
        self._failures = 0
        self._uploaded: set[str] = set()  # files of the job in hand already on the remote
        self._uploaded_for: _Job | None = None
        #: Set by the writer lease (spotsafe.checkpoint.lease): raises WriterFenced when a newer writer
        #: owns the remote; asked before every commit on the remote tier.
        self.fence: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"spotsafe-mirror-upload({remote.url})", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"MirrorStore(local={self.local.url!r}, remote={self.remote.url!r})"

    # ------------------------------------------------------------------ writes (local first)

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        self.local.write_file(path, buffers)

    def commit_file(self, path: str, data: bytes) -> None:
        path = path.strip("/")
        self.local.commit_file(path, data)  # the durability point
        with self._cond:
            self._deleting = {d for d in self._deleting if not _under(path, d)}
        self._enqueue(_Job("upload", path))

    def delete_dir(self, path: str) -> None:
        path = path.strip("/")
        self.local.delete_dir(path)
        with self._cond:
            # Hidden on the remote tier at once; the remote delete itself is queued behind
            # the uploads (never blocking a save on a slow upload, never racing one).
            self._deleting.add(path)
            # An upload of something about to be deleted is wasted work: drop it.
            self._queue = collections.deque(j for j in self._queue if not (j.kind == "upload" and _under(j.path, path)))
        self._enqueue(_Job("delete", path))

    def create_file(self, path: str, data: bytes) -> bool:
        """Create ``path`` exclusively on the local tier (the durability point), then upload it like a commit.

        The writer lease creates its generation on each tier itself (``tiers``); what comes
        here is a manifest, named by its writer's generation, so the upload (a plain
        replace on the remote tier) can only ever replace that same writer's copy.
        """
        path = path.strip("/")
        if not self.local.create_file(path, data):
            return False
        with self._cond:
            self._deleting = {d for d in self._deleting if not _under(path, d)}
        self._enqueue(_Job("upload", path))
        return True

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise StoreError(f"{self!r}: store is closed")
        with self._cond:
            # The job in hand (the head while busy) read its files already: a re-save of the
            # same step must go up again after it, so only jobs still waiting count as duplicates.
            waiting = list(self._queue)[1:] if self._busy is not None else list(self._queue)
            if job not in waiting:
                self._queue.append(job)
            self._cond.notify_all()

    # ------------------------------------------------------------------ reads (both tiers)

    def _hidden(self, path: str) -> bool:
        """True when ``path`` is under a directory deleted here but not yet on the remote."""
        path = path.strip("/")
        with self._cond:
            return any(_under(path, d) for d in self._deleting)

    def listdir(self, path: str = "") -> list[str]:
        names = set(self.local.listdir(path))
        if self._hidden(path):
            return sorted(names)
        try:
            remote = self.remote.listdir(path)
        except Exception as e:
            if not names:
                raise
            log.warning("%s: remote listing failed, using the local tier only: %s", self.remote.url, e)
            remote = []
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        names.update(n for n in remote if not self._hidden(prefix + n))
        return sorted(names)

    def file_size(self, path: str) -> int | None:
        size = self.local.file_size(path)
        if size is not None or self._hidden(path):
            return size
        return self.remote.file_size(path)

    def file_sizes(self, path: str) -> dict[str, int]:
        # The local tier when it holds the directory (no round trip); the remote otherwise.
        # A file missing from this answer is asked for with file_size(), which looks in both.
        sizes = self.local.file_sizes(path)
        if sizes or self._hidden(path):
            return sizes
        return self.remote.file_sizes(path)

    def read_file(self, path: str) -> memoryview:
        try:
            return self.local.read_file(path)
        except CheckpointNotFound:
            if self._hidden(path):
                raise
            return self.remote.read_file(path)

    def read_files_into(self, items: Sequence[tuple[str, memoryview]]) -> None:
        # What the local tier holds is read there; the rest in one batch from the remote,
        # so a fresh instance restores with the remote's parallel reads.
        missing: list[tuple[str, memoryview]] = []
        for path, dest in items:
            if self.local.file_size(path) is None and not self._hidden(path):
                missing.append((path, dest))
            else:
                self.local.read_files_into([(path, dest)])
        if missing:
            self.remote.read_files_into(missing)

    # ------------------------------------------------------------------ lifecycle

    def cleanup_incomplete(self) -> None:
        """Clean the local tier now; the remote one in the background, once.

        The background pass also queues checkpoints committed locally that the remote
        lacks (the instance stopped before their upload finished). Nothing here waits
        on the network: the checkpointer calls this on its save path.
        """
        self.local.cleanup_incomplete()
        if not self._resynced:
            self._resynced = True
            self._enqueue(_Job("resync", ""))

    def _resync(self) -> None:
        self.remote.cleanup_incomplete()
        for name in sorted(self.local.listdir("")):
            manifest = f"{name}/{MANIFEST}"
            if self.local.file_size(manifest) is None:
                continue
            try:
                remote = bytes(self.remote.read_file(manifest))
            except CheckpointNotFound:
                log.info("%s: %s was never uploaded; queueing it", self.remote.url, name)
                self._enqueue(_Job("upload", manifest))
                continue
            # Content, not presence: a step re-saved after its first upload differs here.
            if remote != bytes(self.local.read_file(manifest)):
                log.info("%s: the remote copy of %s is an older version; queueing the upload", self.remote.url, name)
                self._enqueue(_Job("upload", manifest))
        # The run's events and images (spotsafe.story.events): files of their own, never rewritten.
        for directory in _OWN_FILES:
            local = self.local.listdir(directory)
            if local:
                uploaded = set(self.remote.listdir(directory))
                for name in sorted(set(local) - uploaded):
                    self._enqueue(_Job("upload", f"{directory}/{name}"))

    def set_deadline(self, deadline: datetime | None) -> None:
        self._deadline = deadline  # close() stops waiting for uploads there
        self.local.set_deadline(deadline)
        self.remote.set_deadline(deadline)

    @property
    def pending(self) -> list[str]:
        """Paths still to be uploaded or deleted remotely, oldest first."""
        with self._cond:  # the job in hand stays at the head of the queue until done
            return [j.path for j in self._queue if j.kind != "resync"]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued upload and delete reached the remote. True when none is left."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy is not None:
                if not self._thread.is_alive():
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            return True

    def close(self) -> None:
        if self._closed:
            return
        # Wait for uploads while they succeed; give up when they keep failing (the local
        # copies stay, and the next start's cleanup_incomplete queues them again).
        end = None if self.close_timeout is None else time.monotonic() + self.close_timeout
        while not self.flush(timeout=1.0):
            past_deadline = self._deadline is not None and datetime.now(timezone.utc) >= self._deadline
            if self._failures >= 5 or past_deadline or (end is not None and time.monotonic() >= end):
                log.error(
                    "%s: closing with %d checkpoint(s) not uploaded (kept locally in %s): %s",
                    self.remote.url,
                    len(self.pending),
                    self.local.url,
                    self.pending,
                )
                break
        self._closed = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join()
        self.local.close()
        self.remote.close()

    # ------------------------------------------------------------------ the upload thread

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                job = self._queue[0]
                self._busy = job
            try:
                self._do(job)
            except Exception as e:  # noqa: BLE001 - kept in last_error and retried with backoff
                self.last_error = e
                self._failures += 1
                delay = min(60.0, self.retry_interval * 2 ** min(self._failures - 1, 6))
                log.warning(
                    "%s: background %s of %s failed (attempt %d), retrying in %.1fs: %s",
                    self.remote.url,
                    job.kind,
                    job.path,
                    self._failures,
                    delay,
                    e,
                )
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()
                self._stop.wait(delay)
                continue
            self._failures = 0
            self._uploaded_for = None
            with self._cond:
                if self._queue and self._queue[0] == job:
                    self._queue.popleft()
                self._busy = None
                self._cond.notify_all()

    def _do(self, job: _Job) -> None:
        if job.kind == "resync":
            self._resync()
            return
        if job.kind == "delete":
            if self._fenced(job):
                return  # a superseded writer's retention must not prune the new writer's remote copies
            self.remote.delete_dir(job.path)
            with self._cond:
                if not any(j.kind == "delete" and j.path == job.path for j in list(self._queue)[1:]):
                    self._deleting.discard(job.path)
            return
        if "/" not in job.path or not job.path.endswith(f"/{MANIFEST}"):
            # A file of its own (the completion marker, an event object, an image): just it.
            if self._fenced(job):
                return
            try:
                data = bytes(self.local.read_file(job.path))
            except CheckpointNotFound:
                return  # deleted locally since: nothing to mirror
            self.remote.commit_file(job.path, data)
            return
        directory = job.path.rsplit("/", 1)[0]
        try:
            manifest = bytes(self.local.read_file(job.path))
        except CheckpointNotFound:
            return  # deleted locally since: nothing to mirror
        if self._uploaded_for != job:
            self._uploaded_for = job
            self._uploaded.clear()
        try:
            for rel in self._walk(directory):
                if rel == job.path or rel in self._uploaded:
                    continue
                self.remote.write_file(rel, [self.local.read_file(rel)])
                self._uploaded.add(rel)  # a retry of this job skips it
        except CheckpointNotFound:
            if self.local.file_size(job.path) is None:
                return  # retention deleted it locally meanwhile; its remote delete is queued
            raise
        if self._fenced(job):
            return
        self.remote.commit_file(job.path, manifest)  # last: the remote commit point

    @property
    def tiers(self) -> tuple[Store, ...]:
        return (self.local, self.remote)

    def set_fence(self, check: Callable[[], None]) -> None:
        self.fence = check

    def _fenced(self, job: _Job) -> bool:
        """True (logged) when a newer writer owns the remote: this upload must not commit there."""
        fence = self.fence
        if fence is None:
            return False
        try:
            fence()
        except WriterFenced as e:
            log.error("%s: not uploading %s: %s", self.remote.url, job.path, e)
            return True
        return False

    def _walk(self, directory: str) -> list[str]:
        files: list[str] = []
        for name in sorted(self.local.listdir(directory)):
            rel = f"{directory}/{name}"
            if self.local.listdir(rel):
                files.extend(self._walk(rel))  # a subdirectory
            elif self.local.file_size(rel) is not None:
                files.append(rel)
        return files


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")
