"""A Checkpointer alone (no Run) under torchrun: collective saves and restores, every rank the same step.

argv: OUT_DIR STORE_DIR
"""

from __future__ import annotations

import sys

import torch
from _common import finish, init, report

from spotsafe.checkpoint.writer import Checkpointer


def main() -> None:
    rank, world = init()
    store = sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ckpt = Checkpointer(store, dist="auto", per_rank=("mine",), async_=True, keep_last=5)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(step, {"model": model, "mine": torch.tensor([rank * 100 + step])})
    ckpt.wait()
    generation = ckpt.lease.generation if ckpt.lease is not None else None
    ckpt.close()

    fresh = torch.nn.Linear(4, 2)
    reader = Checkpointer(store, dist="auto", per_rank=("mine",))
    rest = reader.restore(None, {"model": fresh})
    reader.close()
    report(
        f"alone-{rank}.json",
        {
            "step": reader.last_loaded.step if reader.last_loaded else None,
            "weight": float(fresh.weight[0, 0]),
            "mine": int(rest["mine"][0]),
            "generation": generation,
            "world": world,
        },
    )
    finish()


if __name__ == "__main__":
    main()
