"""Agreement on a notice across ranks: every rank acts on it at the same step.

The doomed instance is the only one that gets the notice; every ``every`` steps each
rank contributes ``[level, -deadline, -rank]`` to an ``all_reduce(MAX)`` (level 0 none /
1 rebalance / 2 final, the earliest deadline, the lowest reporting rank). By default the
reduce is started asynchronously at one check and waited at the next, so it runs behind
a step of compute. Every rank gets the same answer at the same step.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from spotsafe.distributed.context import DistContext
from spotsafe.errors import DistributedError

if TYPE_CHECKING:
    from spotsafe.cloud.notice import Notice

log = logging.getLogger("spotsafe.distributed")

LEVEL_NONE = 0
LEVEL_REBALANCE = 1
LEVEL_FINAL = 2


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
    6-element float64 tensor over the gloo agreement group (``all_reduce(MAX)``:
    notice level, minus the deadline, minus the reporting rank, a "save due"
    flag, rank 0's proposal for ``every``, the in-memory snapshot cadence each
    rank wishes for). The largest snapshot wish becomes :attr:`snapshot_every` on
    every rank after the same call, so every rank snapshots the same steps.

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
        self._snapshot_wish = 0
        #: Steps between in-memory snapshots every rank agreed on (the largest wish; 0: none agreed yet).
        self.snapshot_every = 0

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
            [
                float(self._seen_level),
                -self._seen_deadline,
                -float(reporting),
                float(due),
                float(self._propose()),
                float(self._snapshot_wish),
            ],
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
        snapshot_every = int(t[5].item())
        if snapshot_every >= 1:
            self.snapshot_every = snapshot_every  # likewise
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

    def step(
        self, notice: Notice | None, step: int | None = None, *, due: bool = False, snapshot_every: int = 0
    ) -> Agreement | None:
        """Fold in this rank's notice; returns a *new* (stronger) agreement, else None.

        Must be called on every rank, the same number of times. ``step`` only labels
        the result (defaults to the number of calls so far). ``due`` is this rank's
        wish to save (e.g. rank 0's ``every_seconds`` clock); :meth:`take_due` tells
        every rank, at the same step, that some rank asked. ``snapshot_every`` is this
        rank's wish for the snapshot cadence (0: none); see :attr:`snapshot_every`.
        """
        self._calls += 1
        self._snapshot_wish = max(0, int(snapshot_every))
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
