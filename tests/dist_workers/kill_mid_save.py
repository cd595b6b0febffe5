"""A rank dies (SIGKILL) in the middle of writing its shard.

argv: OUT_DIR STORE_DIR BARRIER_TIMEOUT MODE (kill | hang | fail)

Step 1 is saved and committed normally. During step 2, rank 1's store write
stops half-way: MODE "kill" kills its own process (SIGKILL) after half the
bytes are on disk; MODE "hang" leaves it stuck (a frozen instance, no socket
reset to notice). Rank 0 must raise DistributedError naming rank 1 within the
barrier timeout, and must not commit. MODE "fail": rank 1's write raises (disk
full) and it says so at the barrier: rank 0 fails at once, naming it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

import torch
from _common import finish, init, manifest_commit, report
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

from spotsafe.distributed.commit import FileRecord, persist_rank_files
from spotsafe.distributed.context import DistContext
from spotsafe.distributed.dcp import save_sharded
from spotsafe.errors import DistributedError
from spotsafe.storage.base import Buffer
from spotsafe.storage.local import LocalStore


class DyingStore(LocalStore):
    """A real local store whose process dies half-way through a shard write once armed."""

    armed = False
    mode = "kill"

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        if self.armed and path.endswith(".distcp"):
            data = b"".join(bytes(b) for b in buffers)
            full = self._full(path)
            full.parent.mkdir(parents=True, exist_ok=True)
            with open(full, "wb") as f:  # a torn file, as a dying writer would leave
                f.write(data[: len(data) // 2])
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)  # hung; torchrun ends it once rank 0 has failed
            os._exit(9)
        super().write_file(path, buffers)


def fail_to_write(ctx: DistContext, store: LocalStore, timeout: float) -> None:
    """Rank 1's write raises (a full disk): it votes no at the barrier; nobody waits, nothing commits."""
    directory = "step-000000000002"
    committed: list[int] = []

    def write() -> list[FileRecord]:
        if ctx.rank == 1:
            raise OSError(28, "No space left on device")
        store.write_file(f"{directory}/rank0.bin", [b"x" * 100])
        return [FileRecord("rank0.bin", 100, "0")]

    started = time.monotonic()
    try:
        persist_rank_files(ctx, write, lambda files: committed.append(len(files)), timeout=timeout)
    except (DistributedError, OSError) as e:
        report(
            f"kill-{ctx.rank}.json",
            {
                "rank": ctx.rank,
                "error": str(e),
                "type": type(e).__name__,
                "elapsed": time.monotonic() - started,
                "committed": committed,
            },
        )
        finish()
        sys.exit(3)
    report(f"kill-{ctx.rank}.json", {"rank": ctx.rank, "error": None, "committed": committed})


def main() -> None:
    rank, world = init()
    # torchrun tears the job down with SIGTERM when a worker dies; rank 0 keeps
    # going long enough to report (spotsafe's watcher treats SIGTERM as a notice anyway).
    if rank == 0:
        signal.signal(signal.SIGTERM, lambda *_: None)
    timeout = float(sys.argv[3])
    ctx = DistContext.detect()
    assert ctx is not None
    store = DyingStore(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    fully_shard(model)
    msd, _ = get_state_dict(model, [])
    save_sharded(
        {"model": msd},
        store,
        "step-000000000001",
        ctx=ctx,
        commit=manifest_commit(store, "step-000000000001", 1, world),
        timeout=timeout,
    )

    if sys.argv[4] == "fail":
        fail_to_write(ctx, store, timeout)
        return
    store.armed = rank == 1
    store.mode = sys.argv[4]
    committed: list[int] = []
    started = time.monotonic()
    try:
        save_sharded(
            {"model": msd},
            store,
            "step-000000000002",
            ctx=ctx,
            commit=lambda files: committed.append(len(files)),
            timeout=timeout,
        )
    except DistributedError as e:
        report(
            f"kill-{rank}.json",
            {
                "rank": rank,
                "error": str(e),
                "type": type(e).__name__,
                "elapsed": time.monotonic() - started,
                "committed": committed,
            },
        )
        sys.exit(3)
    report(
        f"kill-{rank}.json",
        {"rank": rank, "error": None, "committed": committed, "elapsed": time.monotonic() - started},
    )


if __name__ == "__main__":
    main()
