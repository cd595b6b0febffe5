"""Notice agreement: a notice appears on rank 1 only; every rank must agree at the same step.

argv: OUT_DIR NOTICE_STEP
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed
from _common import finish, init, report

from spotsafe.cloud.notice import Notice
from spotsafe.distributed.agreement import NoticeAgreement
from spotsafe.distributed.context import DistContext


def run(
    ctx: DistContext,
    every: int | str,
    async_: bool,
    notice_step: int,
    action: str,
    steps: int = 40,
    step_time: float = 0.0,
) -> dict:
    if every == "auto":
        # auto: rank 0 proposes every = interval / step time (here about 10)
        agreement = NoticeAgreement(ctx, every="auto", async_=async_, interval=10 * step_time)
    else:
        agreement = NoticeAgreement(ctx, every=int(every), async_=async_)
    now = datetime.now(timezone.utc)
    notice = None
    agreed_at = None
    result = None
    every_then = None
    every_max = 0  # the largest every in force from the notice to the agreement (auto may change it)
    for step in range(1, steps + 1):
        if ctx.rank == 1 and step == notice_step:
            notice = Notice(source="manual", action=action, deadline=now + timedelta(seconds=120), detected_at=now)
        torch.mm(torch.randn(32, 32), torch.randn(32, 32))  # a token of compute
        if step_time:
            time.sleep(step_time)
        if step >= notice_step and agreed_at is None:  # the every this step's check goes by
            every_max = max(every_max, agreement.every)
        got = agreement.step(notice, step)
        if got is not None and agreed_at is None:
            agreed_at = step
            result = got
            every_then = agreement.every
    agreement.drain()
    assert result is not None
    return {
        "every": every,
        "async": async_,
        "agreed_at": agreed_at,
        "bound": agreement.bound_steps(),
        "every_then": every_then,
        "every_max": every_max,
        "level": result.level,
        "source_rank": result.source_rank,
        "deadline": result.deadline.isoformat() if result.deadline else None,
        "expected_deadline": (now + timedelta(seconds=120)).isoformat() if ctx.rank == 1 else None,
    }


def main() -> None:
    rank, _ = init()
    notice_step = int(sys.argv[2])
    ctx = DistContext.detect()
    assert ctx is not None
    results = [
        run(ctx, 1, True, notice_step, "terminate"),
        run(ctx, 3, True, notice_step, "terminate"),
        run(ctx, 3, False, notice_step, "rebalance"),
        run(ctx, "auto", True, 30, "terminate", steps=90, step_time=0.002),
    ]
    # the cost of one synchronous agreement, for the record
    agreement = NoticeAgreement(ctx, every=1, async_=False)
    t = time.perf_counter()
    for _ in range(200):
        agreement.step(None)
    sync_us = (time.perf_counter() - t) / 200 * 1e6
    # a peer that never joins: rank 1's drain gives up after its timeout instead of hanging
    late = NoticeAgreement(ctx, every=1, async_=True)
    abandoned = None
    if rank == 1:
        late.step(None)
        t = time.monotonic()
        assert late.drain(timeout=0.5) is None
        abandoned = time.monotonic() - t
    torch.distributed.barrier()
    if rank == 0:
        late.step(None)  # joins rank 1's abandoned reduce, so nothing is left dangling
        late.drain()
    report(f"agree-{rank}.json", {"rank": rank, "runs": results, "sync_us": sync_us, "abandoned": abandoned})
    finish()


if __name__ == "__main__":
    main()
