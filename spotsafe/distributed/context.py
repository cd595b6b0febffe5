"""The process-group context of a multi-rank run: two gloo groups beside the training backend.

:class:`DistContext` wraps an initialized default process group and owns two extra
**gloo** groups (created once, on every rank): one for the notice agreement, one for
checkpoint collectives. Gloo runs on the CPU, so both work beside NCCL training, and
keeping them apart means a background save's barrier never interleaves with the
training thread's agreement.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from spotsafe.errors import DistributedError

log = logging.getLogger("spotsafe.distributed")

#: Default timeout (seconds) of checkpoint barriers and of the gloo groups' collectives.
DEFAULT_TIMEOUT = 600.0


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
