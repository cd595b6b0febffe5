"""Multi-rank runs under ``torchrun``: agreement on a notice, who writes what, sharded state.

Everything here rides on ``torch.distributed`` itself; nothing replaces it:

- :class:`DistContext` wraps an initialized default process group and owns two
  extra **gloo** groups (created once, on every rank): one for the notice
  agreement, one for checkpoint collectives. Gloo runs on the CPU, so both work
  beside NCCL training, and keeping them apart means a background save's
  barrier never interleaves with the training thread's agreement.
- :class:`NoticeAgreement`: the doomed instance is the only one that gets the
  notice; every ``every`` steps each rank contributes ``[level, -deadline,
  -rank]`` to an ``all_reduce(MAX)`` (level 0 none / 1 rebalance / 2 final, the
  earliest deadline, the lowest reporting rank). By default the reduce is started
  asynchronously at one check and waited at the next, so it runs behind a step
  of compute. Every rank gets the same answer at the same step.
- Writer roles for replicated (DDP) state: rank 0 writes model/optimizer, every
  rank writes its own small file (RNG, data position); see :func:`source_rank`
  and :class:`ElasticDistributedSampler` for a changed world size.
- Sharded (FSDP / DTensor) state goes through ``torch.distributed.checkpoint``
  (DCP) into ``<step dir>/dcp/`` of any spotsafe store, under spotsafe's commit
  protocol: every rank's shards durable, then a ``monitored_barrier`` with a
  timeout (a missing rank is named in a :class:`~spotsafe.errors.DistributedError`),
  then rank 0 commits the manifest last. See :func:`save_sharded`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import math
import os
import pickle
import re
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from spotsafe.errors import CheckpointCorrupt, DistributedError, UnsafeCheckpoint, WriterFenced

if TYPE_CHECKING:
    from spotsafe.interruption import Notice
    from spotsafe.storage import Store

log = logging.getLogger(__name__)

#: Format version of what this module adds to a checkpoint (the ``dcp/`` layout and rank files).
FORMAT_VERSION = 1

#: Default timeout (seconds) of checkpoint barriers and of the gloo groups' collectives.
DEFAULT_TIMEOUT = 600.0

LEVEL_NONE = 0
LEVEL_REBALANCE = 1
LEVEL_FINAL = 2

#: Directory, inside a checkpoint, that DCP writes sharded state into.
DCP_DIR = "dcp"


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class DistContext:
    """This process's place in an initialized ``torch.distributed`` job.

    Build it with :meth:`detect` on **every** rank (it creates process groups,
    which is itself a collective).
    """

    rank: int
    world_size: int
    local_rank: int
    #: backend of the default (training) group, e.g. "nccl" or "gloo"
    backend: str
    #: gloo group for checkpoint collectives (barrier, gather of file lists, DCP)
    group: Any
    #: gloo group for the notice agreement (kept apart from ``group``, see module doc)
    agreement_group: Any
    #: timeout of the gloo groups' collectives, seconds
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def detect(cls, *, timeout: float = DEFAULT_TIMEOUT) -> DistContext | None:
        """The context of the initialized default process group, or None when there is none.

        The gloo groups are created once per default group and reused by later calls.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        default = dist.group.WORLD
        with _GROUPS_LOCK:
            cached = _GROUPS.get(id(default))
            if cached is None or cached[0] is not default:
                td = _dt.timedelta(seconds=timeout)
                # new_group is a collective: every rank reaches this line in the same order.
                ckpt_group = dist.new_group(backend="gloo", timeout=td)
                agree_group = dist.new_group(backend="gloo", timeout=td)
                cached = (default, ckpt_group, agree_group, timeout)
                _GROUPS[id(default)] = cached
        _, ckpt_group, agree_group, group_timeout = cached
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            backend=str(dist.get_backend()),
            group=ckpt_group,
            agreement_group=agree_group,
            timeout=group_timeout,
        )

    @property
    def is_coordinator(self) -> bool:
        """Rank 0: the one writer of replicated state and of the manifest."""
        return self.rank == 0

    def barrier(self, timeout: float | None = None, *, what: str = "checkpoint") -> None:
        """``monitored_barrier`` on the checkpoint group; a rank that does not arrive in time is named.

        Raises :class:`DistributedError` listing the missing rank(s) (on rank 0,
        which sees them all) or saying that the coordinator went away (elsewhere).
        """
        import torch.distributed as dist

        t = self.timeout if timeout is None else timeout
        started = time.monotonic()
        try:
            dist.monitored_barrier(self.group, timeout=_dt.timedelta(seconds=t), wait_all_ranks=True)
        except RuntimeError as e:
            missing = missing_ranks(str(e))
            waited = time.monotonic() - started
            if missing:
                who = ", ".join(str(r) for r in missing)
                noun = "rank" if len(missing) == 1 else "ranks"
                raise DistributedError(
                    f"{what}: {noun} {who} did not reach the barrier within {t:g} s "
                    f"(waited {waited:.1f} s on rank {self.rank}); nothing was committed: {e}"
                ) from e
            raise DistributedError(
                f"{what}: barrier failed on rank {self.rank} after {waited:.1f} s "
                f"(the coordinator or a peer went away); nothing was committed: {e}"
            ) from e

    def leave(self, timeout: float = 30.0) -> None:
        """Barrier, then destroy the process group: ranks about to exit leave gloo together.

        Call only when the process is about to exit (``Run`` does, before exit 75):
        a rank whose peers already closed their sockets can otherwise abort in
        gloo's teardown and exit with SIGABRT instead of its own status.
        """
        import torch.distributed as dist

        try:
            self.barrier(timeout, what="leaving the job")
        except DistributedError as e:
            log.warning("rank %d: %s", self.rank, e)
        with _GROUPS_LOCK:
            _GROUPS.clear()
        if dist.is_initialized():
            dist.destroy_process_group()

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere), over the checkpoint group."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        dist.gather_object(obj, out, dst=_global_rank(self.group, 0), group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank, over the checkpoint group."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=_global_rank(self.group, 0), group=self.group)
        return box[0]


_GROUPS: dict[int, tuple[Any, Any, Any, float]] = {}
_GROUPS_LOCK = threading.Lock()


def _global_rank(group: Any, group_rank: int) -> int:
    import torch.distributed as dist

    return int(dist.get_global_rank(group, group_rank))


_MISSING_RE = re.compile(r"Ranks? ([\d,\s]+?) failed to pass monitoredBarrier")


def missing_ranks(message: str) -> list[int]:
    """The ranks a gloo ``monitored_barrier`` error names as missing (empty when it names none)."""
    found: set[int] = set()
    for m in _MISSING_RE.finditer(message):
        found.update(int(x) for x in re.findall(r"\d+", m.group(1)))
    return sorted(found)


# --------------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class Agreement:
    """What every rank agreed on, at the same step."""

    #: LEVEL_REBALANCE (1) or LEVEL_FINAL (2)
    level: int
    #: earliest deadline any rank reported (UTC), None when none gave one
    deadline: _dt.datetime | None
    #: lowest rank that reported the notice
    source_rank: int
    #: the step (count of :meth:`NoticeAgreement.step` calls, or the step passed) it was agreed at
    step: int

    @property
    def is_final(self) -> bool:
        return self.level >= LEVEL_FINAL

    @property
    def action(self) -> Literal["final", "rebalance"]:
        return "final" if self.is_final else "rebalance"

    def time_left(self) -> float | None:
        if self.deadline is None:
            return None
        return (self.deadline - _dt.datetime.now(_dt.timezone.utc)).total_seconds()


def notice_level(notice: Notice | None) -> int:
    """0 for no notice, 1 for a rebalance recommendation, 2 for a final one."""
    if notice is None:
        return LEVEL_NONE
    return LEVEL_FINAL if notice.is_final else LEVEL_REBALANCE


class NoticeAgreement:
    """Make every rank see the same notice at the same step.

    Call :meth:`step` on every rank once per training step, with that rank's
    local notice (``watcher.notice``). Every ``every`` calls, the ranks reduce a
    5-element float64 tensor over the gloo agreement group (``all_reduce(MAX)``:
    notice level, minus the deadline, minus the reporting rank, a "save due"
    flag, rank 0's proposal for ``every``).

    With ``async_=True`` (default) the reduce is started at one check and waited
    at the next, so its latency overlaps ``every`` steps of compute. A notice that
    becomes visible on any rank during step ``s`` is agreed by every rank at the
    same step, at most ``2 * every - 1`` steps later (``every - 1`` with
    ``async_=False``); :meth:`bound_steps` gives the figure. Agreement only ever
    rises (none → rebalance → final) and is sticky.

    ``every="auto"`` (default): rank 0 times the steps and proposes, inside the
    reduce itself, the ``every`` that spaces agreements ``interval`` seconds apart
    (1 to ``max_every``); every rank switches at the same call, so the cost per
    step stays near ``cost_of_one_reduce / every`` and the bound near
    ``2 * interval`` seconds, whatever the step time.
    """

    def __init__(
        self,
        ctx: DistContext,
        *,
        every: int | Literal["auto"] = "auto",
        async_: bool = True,
        interval: float = 0.5,
        max_every: int = 1000,
    ) -> None:
        self.auto = every == "auto"
        if not self.auto and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an int >= 1 or 'auto', got {every!r}")
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.ctx = ctx
        self.every: int = 1 if self.auto else int(every)
        self.async_ = async_
        self.interval = interval
        self.max_every = max_every
        self._calls = 0
        self._pending: tuple[Any, Any] | None = None  # (work, tensor)
        self._agreed: Agreement | None = None
        self._seen_level = LEVEL_NONE
        self._seen_deadline = math.inf
        self._due = False
        self._due_wish = False
        self._last_check: tuple[int, float] | None = None  # (calls, monotonic) at the last check

    @property
    def agreed(self) -> Agreement | None:
        """The strongest agreement reached so far (None before any)."""
        return self._agreed

    def bound_steps(self) -> int:
        """Most steps that can pass between a rank seeing a notice and every rank agreeing."""
        return 2 * self.every - 1 if self.async_ else self.every - 1

    def _local(self, notice: Notice | None, due: bool) -> Any:
        import torch

        level = notice_level(notice)
        if level > self._seen_level:
            self._seen_level = level
        if notice is not None:
            self._seen_deadline = min(self._seen_deadline, notice.deadline.timestamp())
        reporting = self.ctx.rank if self._seen_level > LEVEL_NONE else math.inf
        return torch.tensor(
            [float(self._seen_level), -self._seen_deadline, -float(reporting), float(due), float(self._propose())],
            dtype=torch.float64,
        )

    def _propose(self) -> int:
        """Rank 0's proposal for ``every`` (0 = no opinion) from the time its last steps took."""
        if not self.auto or not self.ctx.is_coordinator:
            return 0
        now = time.monotonic()
        last, self._last_check = self._last_check, (self._calls, now)
        if last is None or self._calls <= last[0]:
            return 0
        step_time = (now - last[1]) / (self._calls - last[0])
        if step_time <= 0:
            return self.max_every
        return max(1, min(self.max_every, int(self.interval / step_time)))

    def _start(self, notice: Notice | None, *, async_op: bool, due: bool = False) -> tuple[Any, Any]:
        import torch.distributed as dist

        t = self._local(notice, due)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.agreement_group, async_op=async_op)
        return work, t

    def _finish(self, pending: tuple[Any, Any], step: int) -> Agreement | None:
        work, t = pending
        if work is not None:
            try:
                work.wait()
            except RuntimeError as e:
                raise DistributedError(f"notice agreement failed on rank {self.ctx.rank} at step {step}: {e}") from e
        if t[3].item() > 0:
            self._due = True
        proposal = int(t[4].item())
        if self.auto and proposal >= 1:
            self.every = proposal  # same value, same call, on every rank
        level = int(t[0].item())
        if level <= (self._agreed.level if self._agreed else LEVEL_NONE):
            return None
        neg_deadline = float(t[1].item())
        deadline = None if math.isinf(neg_deadline) else _dt.datetime.fromtimestamp(-neg_deadline, _dt.timezone.utc)
        agreement = Agreement(level=level, deadline=deadline, source_rank=int(-t[2].item()), step=step)
        self._agreed = agreement
        log.info(
            "rank %d: all %d ranks agreed on a %s notice from rank %d at step %d",
            self.ctx.rank,
            self.ctx.world_size,
            agreement.action,
            agreement.source_rank,
            step,
        )
        return agreement

    def step(self, notice: Notice | None, step: int | None = None, *, due: bool = False) -> Agreement | None:
        """Fold in this rank's notice; returns a *new* (stronger) agreement, else None.

        Must be called on every rank, the same number of times. ``step`` only labels
        the result (defaults to the number of calls so far). ``due`` is this rank's
        wish to save (e.g. rank 0's ``every_seconds`` clock); :meth:`take_due` tells
        every rank, at the same step, that some rank asked.
        """
        self._calls += 1
        label = self._calls if step is None else step
        if self._calls % self.every:
            self._due_wish = self._due_wish or due
            return None
        due = due or self._due_wish
        self._due_wish = False
        if not self.async_:
            return self._finish(self._start(notice, async_op=False, due=due), label)
        result = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            result = self._finish(pending, label)
        self._pending = self._start(notice, async_op=True, due=due)
        return result

    def take_due(self) -> bool:
        """True (once) when an agreement since the last call carried some rank's ``due`` wish.

        Every rank sees the same answer after the same :meth:`step` call.
        """
        due, self._due = self._due, False
        return due

    def now(self, notice: Notice | None, step: int | None = None) -> Agreement | None:
        """A blocking agreement right now (drains any reduce in flight first); every rank must call it."""
        label = self._calls if step is None else step
        result = self.drain(label)
        newer = self._finish(self._start(notice, async_op=False), label)
        return newer or result

    def drain(self, step: int | None = None, *, timeout: float | None = None) -> Agreement | None:
        """Wait for the reduce in flight, if any (call before exiting or tearing down).

        With ``timeout``, give up after that many seconds (a peer that crashed never
        joins the reduce; a process on its way out must not hang on it) and abandon it.
        """
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        work = pending[0]
        if timeout is not None and work is not None:
            end = time.monotonic() + timeout
            while not work.is_completed():
                if time.monotonic() >= end:
                    log.warning("rank %d: abandoning a notice agreement its peers never joined", self.ctx.rank)
                    return None
                time.sleep(0.005)
        return self._finish(pending, self._calls if step is None else step)

    close = drain


# --------------------------------------------------------------------------- DDP writer roles


def rank_file(rank: int) -> str:
    """Base name of rank ``rank``'s own file in a checkpoint (RNG state, data position)."""
    return f"rank-{rank:05d}"


def source_rank(rank: int, old_world_size: int) -> int:
    """Whose per-rank state rank ``rank`` restores from a checkpoint of ``old_world_size`` ranks.

    Same world size: its own. A changed one (elastic): rank ``r`` takes rank
    ``r mod old_world_size``'s RNG streams. The data position is not taken per
    rank: it is re-split from the global samples-consumed count
    (:class:`ElasticDistributedSampler`).
    """
    if old_world_size < 1:
        raise ValueError(f"old world size must be >= 1, got {old_world_size}")
    return rank % old_world_size


def resplit(consumed: int, total: int, world_size: int, rank: int, *, drop_last: bool = False) -> list[int]:
    """Positions (into an epoch's global order of ``total`` samples) that ``rank`` still reads.

    Samples are dealt round-robin (position ``consumed + rank + k * world_size``)
    as ``DistributedSampler`` does, so after every rank has read ``n`` samples the
    ones read are exactly positions ``[start, start + n * world_size)``: the
    global count is enough to resume on any world size with no sample lost or
    repeated (except the padding ``DistributedSampler`` also adds to even the
    ranks out, or drops with ``drop_last``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    remaining = max(total - consumed, 0)
    positions = list(range(consumed, consumed + remaining))
    if drop_last:
        usable = (remaining // world_size) * world_size
        positions = positions[:usable]
    elif positions and remaining % world_size:
        pad = world_size - remaining % world_size
        positions += (positions * math.ceil(pad / len(positions)))[:pad]
    return positions[rank::world_size]


class ElasticDistributedSampler:
    """``DistributedSampler`` that can start mid-epoch at a global sample count, on any world size.

    With ``start=0`` it yields exactly what ``torch.utils.data.DistributedSampler``
    yields (same permutation from ``seed + epoch``, same round-robin split, same
    padding), so it is a drop-in. ``set_position(epoch, consumed)`` makes the
    next iteration skip the first ``consumed`` samples of the epoch's global
    order (as many as *all* ranks together consumed) and deal the rest over
    the current world size. The next ``set_epoch`` starts from 0 again.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
            else:
                num_replicas = 1 if num_replicas is None else num_replicas
                rank = 0 if rank is None else rank
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_position(self, epoch: int, consumed: int) -> None:
        """Resume inside ``epoch`` after ``consumed`` samples of it (summed over all ranks)."""
        self.epoch = epoch
        self.start = max(int(consumed), 0)

    def _order(self) -> list[int]:
        import torch

        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        n = len(order)
        if self.drop_last and n % self.num_replicas:
            n = (n // self.num_replicas) * self.num_replicas
            order = order[:n]
        elif not self.drop_last and n % self.num_replicas and self.start == 0:
            # exactly DistributedSampler's padding
            pad = self.num_replicas - n % self.num_replicas
            order = order + (order * math.ceil(pad / n))[:pad]
            n = len(order)
        positions = resplit(self.start, n, self.num_replicas, self.rank, drop_last=self.drop_last)
        return iter([order[p] for p in positions])

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            n = (n // self.num_replicas) * self.num_replicas
        remaining = max(n - self.start, 0)
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)


# --------------------------------------------------------------------------- sharded state (DCP)


def is_sharded(module: Any) -> bool:
    """True when ``module`` holds DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)."""
    from torch.distributed.tensor import DTensor

    params = getattr(module, "parameters", None)
    return callable(params) and any(isinstance(p, DTensor) for p in params())


class ShardedState:
    """A model (and its optimizer) whose state is sharded: saved and loaded through DCP.

    ``state_dict()``/``load_state_dict()`` go through
    ``torch.distributed.checkpoint.state_dict.get_state_dict``/``set_state_dict``
    (FQN-keyed, DTensor shards). The Checkpointer writes an object of this type
    with :func:`save_sharded` into ``<checkpoint>/dcp/`` instead of its own files;
    ``spotsafe.Run`` wraps an FSDP model and its optimizer in one automatically.
    """

    def __init__(self, model: Any, optimizer: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@dataclass(frozen=True)
class FileRecord:
    """One file a rank wrote into a checkpoint: store path (relative to the checkpoint), size, checksum."""

    path: str
    size: int
    #: xxh3_128 hex digest of the content
    checksum: str


def checksum(data: Any) -> str:
    """The checksum spotsafe records for a file's bytes (xxh3_128, hex)."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def _dcp_filesystem_base() -> type:
    from torch.distributed.checkpoint.filesystem import FileSystemBase

    return FileSystemBase


class _Stream(io.BytesIO):
    """A write buffer that hands its bytes to a callback when closed (DCP closes its streams itself)."""

    def __init__(self, on_close: Callable[[memoryview], None]) -> None:
        super().__init__()
        self._on_close = on_close
        self._aborted = False

    def abort(self) -> None:
        """The writer failed: closing must not publish a partial file."""
        self._aborted = True

    def close(self) -> None:
        if not self.closed and not self._aborted:
            self._aborted = True  # publish once
            with self.getbuffer() as view:
                self._on_close(view)
        super().close()


def _make_store_filesystem() -> type:
    FileSystemBase = _dcp_filesystem_base()

    class StoreFileSystem(FileSystemBase):  # type: ignore[misc, valid-type]
        """DCP's file-system interface over a spotsafe :class:`~spotsafe.storage.Store`.

        Every file is written through ``store.write_file`` (durable on return, any
        backend: local EBS directory, S3, a mirror) and recorded with its size and
        checksum, so the manifest can list DCP's files like any other. DCP writes
        its ``.metadata`` to a temp name and renames it; a store has no rename, so
        the temp file is held in memory and written under its final name.
        """

        def __init__(self, store: Store, expected: Mapping[str, FileRecord] | None = None) -> None:
            self.store = store
            self.records: dict[str, FileRecord] = {}
            self.expected = expected
            self._held: dict[str, bytes] = {}
            self._lock = threading.Lock()

        def _put(self, path: str, data: memoryview) -> None:
            if path.endswith(".tmp"):
                with self._lock:
                    self._held[path] = bytes(data)
                return
            self.store.write_file(path, [data])
            rec = FileRecord(path=path, size=len(data), checksum=checksum(data))
            with self._lock:
                self.records[path] = rec

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
            p = os.fspath(path)
            if "w" in mode:
                stream = _Stream(lambda buf: self._put(p, buf))
                try:
                    yield stream
                except BaseException:
                    stream.abort()
                    raise
                finally:
                    stream.close()
                return
            with self._lock:
                held = self._held.get(p)
            data = held if held is not None else self.store.read_file(p)
            self._verify(p, data)
            with io.BytesIO(data) as reader:
                yield reader

        def _verify(self, path: str, data: Any) -> None:
            if self.expected is None:
                return
            rec = self.expected.get(path)
            if rec is None:
                raise CheckpointCorrupt(f"{self.store.url}/{path}: DCP asked for a file the manifest does not list")
            size = len(data) if not isinstance(data, memoryview) else data.nbytes
            if size != rec.size or checksum(data) != rec.checksum:
                raise CheckpointCorrupt(
                    f"{self.store.url}/{path}: size or checksum does not match the manifest "
                    f"(expected {rec.size} bytes, xxh3_128 {rec.checksum})"
                )

        def concat_path(self, path: Any, suffix: str) -> str:
            base = os.fspath(path).rstrip("/")
            return f"{base}/{suffix}" if base else suffix

        def rename(self, path: Any, new_path: Any) -> None:
            old, new = os.fspath(path), os.fspath(new_path)
            with self._lock:
                data = self._held.pop(old, None)
            if data is None:
                data = bytes(self.store.read_file(old))
            self._put(new, memoryview(data))

        def init_path(self, path: Any) -> str:
            return str(os.fspath(path)).strip("/")

        def mkdir(self, path: Any) -> None:
            pass  # stores create parents on write

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return True

        def exists(self, path: Any) -> bool:
            p = os.fspath(path)
            with self._lock:
                if p in self._held:
                    return True
            return self.store.file_size(p) is not None

        def rm_file(self, path: Any) -> None:
            # Only reached for a stale .metadata before its rewrite; the write overwrites it.
            with self._lock:
                self._held.pop(os.fspath(path), None)

        def ls(self, path: Any) -> list[str]:
            p = os.fspath(path)
            return [self.concat_path(p, name) for name in self.store.listdir(p)]

    return StoreFileSystem


_SAFE_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a pickle) admitting only DCP's own metadata types.

    DCP's reader calls ``pickle.load`` on it; a checkpoint from a shared bucket
    must not be able to run code, so anything else is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch":
            if name == "Size":
                return torch.Size
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif name in _SAFE_DCP_CLASSES.get(module, ()):
            import importlib

            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpoint(f"DCP metadata refers to {module}.{name}, which the safe loader does not admit")


def _make_writer_reader() -> tuple[type, type, type]:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader, _FileSystemWriter

    StoreFileSystem = _make_store_filesystem()

    class StoreWriter(_FileSystemWriter):
        """DCP storage writer into a spotsafe store; barrier after this rank's shards are durable."""

        def __init__(
            self,
            store: Store,
            path: str,
            ctx: DistContext | None,
            barrier_timeout: float | None,
            what: str,
        ) -> None:
            # sync_files=False: store.write_file is durable on return already.
            super().__init__(path, single_file_per_rank=True, sync_files=False, overwrite=True)
            self.fs = StoreFileSystem(store)
            self.path = self.fs.init_path(path)
            self.ctx = ctx
            self.barrier_timeout = barrier_timeout
            self.what = what
            self.barrier_error: DistributedError | None = None

        def write_data(self, plan: Any, planner: Any) -> Any:
            fut = super().write_data(plan, planner)
            fut.wait()  # this rank's shards are durable in the store
            if self.ctx is not None and self.ctx.world_size > 1:
                try:
                    self.ctx.barrier(self.barrier_timeout, what=self.what)
                except DistributedError as e:
                    self.barrier_error = e
                    raise
            return fut

    class StoreReader(FileSystemReader):
        """DCP storage reader from a spotsafe store: checks each file against the manifest, no free unpickling."""

        def __init__(self, store: Store, path: str, expected: Mapping[str, FileRecord] | None) -> None:
            super().__init__(path)
            self.fs = StoreFileSystem(store, expected)
            self.path = self.fs.init_path(path)
            #: a refusal (corrupt file, unsafe metadata) DCP would otherwise bury in its own errors
            self.refused: Exception | None = None

        def read_data(self, plan: Any, planner: Any) -> Any:
            try:
                return super().read_data(plan, planner)
            except (CheckpointCorrupt, UnsafeCheckpoint) as e:
                self.refused = self.refused or e
                raise

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            if self.refused is not None:  # DCP falls back to per-rank metadata: refuse again
                raise self.refused
            rank = kwargs.get("rank")
            path = self._get_metadata_path(rank)
            try:
                with self.fs.create_stream(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (CheckpointCorrupt, UnsafeCheckpoint) as e:
                self.refused = e
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner, but non-tensor values load with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            import torch
            from torch.distributed.checkpoint._traverse import set_element

            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return StoreWriter, StoreReader, SafeLoadPlanner


_CLASSES: tuple[type, type, type] | None = None


def _classes() -> tuple[type, type, type]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_writer_reader()
    return _CLASSES


def save_sharded(
    state: Mapping[str, Any],
    store: Store,
    directory: str,
    *,
    ctx: DistContext | None = None,
    commit: Callable[[list[FileRecord]], None] | None = None,
    timeout: float | None = None,
) -> list[FileRecord]:
    """Save a (sharded) state dict with DCP into ``<directory>/dcp/`` of ``store``; commit last.

    Every rank must call it. Protocol: each rank writes its shards through
    ``store.write_file`` (durable) → ``monitored_barrier`` with ``timeout`` →
    DCP's coordinator writes ``.metadata`` → the file lists (sizes, checksums)
    are gathered on rank 0 → rank 0 calls ``commit(files)`` (writes the
    manifest) → rank 0's outcome is broadcast, so every rank returns or raises
    together. A rank that dies before the barrier makes the others raise
    :class:`DistributedError` naming it, and ``commit`` is never called.

    Returns every rank's files (on every rank), paths relative to ``directory``.
    For FSDP state use ``torch.distributed.checkpoint.state_dict.get_state_dict``
    to build ``state``.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    StoreWriter, _, _ = _classes()
    directory = directory.strip("/")
    what = f"checkpoint {store.url}/{directory}"
    writer = StoreWriter(store, f"{directory}/{DCP_DIR}", ctx, timeout, what)
    multi = ctx is not None and ctx.world_size > 1
    try:
        with warnings.catch_warnings():
            # one process on purpose: DCP's "assuming the intent is to save in a single process" is noise
            warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
            dcp_save(
                dict(state),
                storage_writer=writer,
                process_group=ctx.group if ctx is not None and multi else None,
                no_dist=not multi,
            )
    except CheckpointException as e:
        if writer.barrier_error is not None:
            raise writer.barrier_error from e
        failures = getattr(e, "failures", {})
        for err in failures.values():
            inner = _unwrap(err)
            if isinstance(inner, DistributedError):
                raise inner from e
        raise DistributedError(f"{what}: sharded save failed: {e}") from e
    except RuntimeError as e:
        if writer.barrier_error is not None:
            raise writer.barrier_error from e
        raise DistributedError(f"{what}: sharded save failed on rank {ctx.rank if ctx else 0}: {e}") from e

    prefix = f"{directory}/"
    mine = [
        FileRecord(path=r.path[len(prefix) :], size=r.size, checksum=r.checksum)
        for r in sorted(writer.fs.records.values(), key=lambda r: r.path)
    ]
    return _commit_collectively(ctx, mine, commit, what)


def _unwrap(err: Any) -> Any:
    # DCP wraps exceptions as (exception, traceback) tuples.
    if isinstance(err, tuple) and err and isinstance(err[0], BaseException):
        return err[0]
    return err


def _commit_collectively(
    ctx: DistContext | None,
    mine: list[Any],
    commit: Callable[[list[Any]], None] | None,
    what: str,
) -> list[Any]:
    """Gather every rank's file entries on rank 0, let it commit, broadcast the outcome.

    Entries are small picklable records with a ``path`` (:class:`FileRecord`, or
    the checkpoint engine's ``FileEntry``); the list rank 0 commits is sorted by path.
    """
    if ctx is None or ctx.world_size == 1:
        if commit is not None:
            commit(sorted(mine, key=lambda r: r.path))
        return sorted(mine, key=lambda r: r.path)
    gathered = ctx.gather_object(list(mine))
    files: list[Any] = []
    if ctx.is_coordinator:
        assert gathered is not None
        seen: dict[str, Any] = {}
        for rank_files in gathered:
            for rec in rank_files:
                seen[rec.path] = rec
        files = [seen[p] for p in sorted(seen)]
        try:
            if commit is not None:
                commit(list(files))
        except BaseException as e:
            kind = "fenced" if isinstance(e, WriterFenced) else "error"
            ctx.broadcast_object((kind, f"{type(e).__name__}: {e}"))
            raise
        ctx.broadcast_object(("ok", files))
        return files
    outcome = ctx.broadcast_object(None)
    if outcome[0] == "fenced":  # every rank stops the same way: another instance owns the store
        raise WriterFenced(f"{what}: {outcome[1]}")
    if outcome[0] != "ok":
        raise DistributedError(f"{what}: rank 0 failed to commit: {outcome[1]}")
    return list(outcome[1])


def commit_rank_files(
    ctx: DistContext | None,
    mine: Sequence[Any],
    commit: Callable[[list[Any]], None],
    *,
    timeout: float | None = None,
    what: str = "checkpoint",
) -> list[Any]:
    """The commit protocol for files each rank wrote itself (DDP: rank 0's model file + every rank's own).

    Call on every rank after its files are durable: ``monitored_barrier`` with
    ``timeout`` (a missing rank is named) → file entries gathered on rank 0 →
    rank 0 runs ``commit`` (the manifest, last) → outcome broadcast, so every
    rank returns the committed entries or raises.
    """
    if ctx is not None and ctx.world_size > 1:
        ctx.barrier(timeout, what=what)
    return _commit_collectively(ctx, list(mine), commit, what)


def persist_rank_files(
    ctx: DistContext | None,
    write: Callable[[], list[Any]],
    commit: Callable[[list[Any]], None],
    *,
    timeout: float | None = None,
    what: str = "checkpoint",
) -> list[Any]:
    """Every rank writes its own files (``write``), then the commit protocol runs.

    ``write`` returns this rank's file entries once they are durable. A rank
    whose write fails still reaches the barrier and votes no, so nobody waits
    for it to time out and nothing is committed; it re-raises its own error,
    the others raise :class:`DistributedError` naming it. A rank that never
    arrives (killed, hung) is named by the barrier.
    """
    error: BaseException | None = None
    mine: list[Any] = []
    try:
        mine = list(write())
    except Exception as e:  # noqa: BLE001 - voted on below, then re-raised
        error = e
    if ctx is None or ctx.world_size == 1:
        if error is not None:
            raise error
        return _commit_collectively(ctx, mine, commit, what)
    ctx.barrier(timeout, what=what)
    failed = failed_ranks(ctx, error is not None)
    if failed:
        if error is not None:
            raise error
        who = ", ".join(map(str, failed))
        raise DistributedError(f"{what}: rank(s) {who} failed to write their files; nothing was committed")
    return _commit_collectively(ctx, mine, commit, what)


def failed_ranks(ctx: DistContext, failed: bool) -> list[int]:
    """The ranks that report ``failed`` (every rank gets the same list); over the checkpoint group."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(ctx.world_size, dtype=torch.int32)
    t[ctx.rank] = int(failed)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return [r for r in range(ctx.world_size) if t[r].item()]


#: Keys of a :class:`spotsafe.Run`'s state that differ per rank (RNG streams, data
#: position); everything else is replicated under DDP and written by rank 0 only.
RANK_KEYS = ("rng", "spotsafe")


def rank_state(state: Mapping[str, Any], ctx: DistContext | None, rank_keys: Sequence[str]) -> dict[str, Any]:
    """What this rank writes: everything on rank 0, only ``rank_keys`` elsewhere (replicated state once)."""
    if ctx is None or ctx.is_coordinator:
        return dict(state)
    return {k: v for k, v in state.items() if k in rank_keys}


def merge_rank_state(
    load_rank: Callable[[int], dict[str, Any]],
    rank: int,
    old_world_size: int,
    rank_keys: Sequence[str],
) -> dict[str, Any]:
    """Rank 0's (replicated) state with ``rank_keys`` taken from :func:`source_rank`'s own file."""
    state = load_rank(0)
    src = source_rank(rank, max(old_world_size, 1))
    if src != 0:
        own = load_rank(src)
        for key in rank_keys:
            if key in own:
                state[key] = own[key]
    return state


def all_ok(ctx: DistContext | None, ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (an all_reduce MIN on the checkpoint group)."""
    if ctx is None or ctx.world_size == 1:
        return ok
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.group)
    return bool(t.item())


def rescale_batch(batch: int, old_world_size: int, new_world_size: int) -> int:
    """The batch index in an epoch that continues it on ``new_world_size`` ranks.

    ``DistributedSampler`` deals the epoch's permutation (the same for every world
    size) round-robin, so after ``batch`` batches per rank on ``old_world_size``
    ranks exactly the first ``batch * old_world_size`` batches' worth of the
    permutation were read; on the new world size rank ``r`` skips its first
    ``batch * old_world_size // new_world_size`` batches, which are those
    samples. Rounding down re-reads less than one batch per rank when it does not
    divide evenly; never skips an unread sample.
    """
    if old_world_size == new_world_size:
        return batch
    return (batch * old_world_size) // new_world_size


def load_sharded(
    state: dict[str, Any],
    store: Store,
    directory: str,
    *,
    ctx: DistContext | None = None,
    files: Sequence[FileRecord] | None = None,
) -> None:
    """Load ``<directory>/dcp/`` into ``state`` in place (DCP reshards to the current world size).

    ``files`` (from the manifest, paths relative to ``directory``) makes every
    file checked against its size and checksum before DCP reads it. Non-tensor
    values and DCP's metadata load without free unpickling.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    _, StoreReader, SafeLoadPlanner = _classes()
    directory = directory.strip("/")
    expected = None
    if files is not None:
        expected = {f"{directory}/{f.path}": f for f in files}
    reader = StoreReader(store, f"{directory}/{DCP_DIR}", expected)
    multi = ctx is not None and ctx.world_size > 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
            dcp_load(
                state,
                storage_reader=reader,
                planner=SafeLoadPlanner(),
                process_group=ctx.group if ctx is not None and multi else None,
                no_dist=not multi,
            )
    except CheckpointException as e:
        if reader.refused is not None:
            raise reader.refused from e
        for err in getattr(e, "failures", {}).values():
            inner = _unwrap(err)
            if isinstance(inner, (CheckpointCorrupt, UnsafeCheckpoint)):
                raise inner from e
        raise DistributedError(f"{store.url}/{directory}: sharded load failed: {e}") from e
