"""A :class:`spotsafe.Run`'s loop-side state when torch.distributed runs several ranks.

Saves and restores are the Checkpointer's own (it holds the context): rank 0 writes
everything, every other rank only its own RNG streams and data position
(:data:`spotsafe.distributed.commit.RANK_KEYS`); after every rank's files are durable (a
monitored barrier), rank 0 commits the manifest. A notice seen by any rank is agreed by
all at the same step (:class:`spotsafe.distributed.agreement.NoticeAgreement`), together
with the periodic save being due and the in-memory snapshot cadence. Resuming on another
world size takes rank ``r mod old`` RNG streams and rescales the batch position.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from spotsafe.distributed.agreement import Agreement, NoticeAgreement
from spotsafe.distributed.context import DistContext

if TYPE_CHECKING:
    from datetime import datetime

    from spotsafe.checkpoint.snapshots import SnapshotKeeper
    from spotsafe.cloud.notice import Notice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalNotice:
    """A final notice every rank agreed on, told as this rank's own when it saw it, else as the source rank's."""

    deadline: datetime | None
    source: str
    action: str
    detected_at: float


class MultiRank:
    """The process-group context and the notice agreement of one rank of several."""

    def __init__(self, ctx: DistContext, agree_every: int | str = "auto") -> None:
        self.ctx = ctx
        self.agreement = NoticeAgreement(ctx, every=agree_every)  # type: ignore[arg-type]

    @classmethod
    def detect(cls, agree_every: int | str = "auto", *, sharded: bool = False) -> MultiRank | None:
        """The multi-rank path when torch.distributed is initialized with world size > 1 (or sharded state)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() < 2 and not sharded:  # sharded state needs DCP even on one rank
            return None
        ctx = DistContext.detect()
        return None if ctx is None else cls(ctx, agree_every)

    def agree(self, notice: Notice | None, step: int, *, due: bool, keeper: SnapshotKeeper | None) -> Agreement | None:
        """One agreement round at ``step`` (every rank calls it at the same step): the notice agreed, if any.

        ``due``: this rank's clock says a periodic save is due; the snapshot cadence is agreed on the way.
        """
        wish = keeper.proposal() if keeper is not None else 0
        agreed = self.agreement.step(notice, step, due=due, snapshot_every=wish)
        if keeper is not None:
            keeper.agree(self.agreement.snapshot_every)  # the same value after the same call on every rank
            keeper.lag_steps = self.agreement.bound_steps()
        return agreed

    @staticmethod
    def final(agreed: Agreement, notice: Notice | None) -> FinalNotice:
        """The agreed final notice as this rank tells of it."""
        local = notice if notice is not None and notice.is_final else None
        if local is None:
            return FinalNotice(agreed.deadline, f"rank {agreed.source_rank}", "terminate", time.time())
        return FinalNotice(agreed.deadline, local.source, local.action, local.detected_at.timestamp())

    def leave(self, step: int, *, drain_may_fail: bool = False) -> None:
        """The run is over on every rank at ``step``: drain the agreement, leave the process group together.

        ``drain_may_fail``: a drain that fails is logged and the rank leaves anyway (a fenced run).
        """
        try:
            self.agreement.drain(step)
        except Exception as e:
            if not drain_may_fail:
                raise
            log.info("draining the notice agreement: %s", e)
        self.ctx.leave()
