"""spotsafe.Run around a DDP loop whose steps can be long; launched by torchrun (2 ranks).

argv: OUT_DIR STORE_DIR

Environment: STEP_SECONDS (Python-level work per step, as a forward pass), LATE_STEP_SECONDS
(from step 6 on). Each rank writes its pid (``pid-r<rank>``) and, after every ``run.step()``,
its step count (``step-r<rank>``); its Run's events go to ``events-r<rank>.jsonl``; rank 0
writes the final weights when the run completes. Notices come from SIGTERM
(``SPOTSAFE_SOURCES=signal``, ``SPOTSAFE_SIGNAL_GRACE``), sent to one rank by the test.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import finish, init
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import spotsafe


def main() -> None:
    out, store = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    rank, world = init()
    os.environ["SPOTSAFE_EVENTS"] = str(out / f"events-r{rank}.jsonl")
    (out / f"pid-r{rank}").write_text(str(os.getpid()))
    step_s = float(os.environ.get("STEP_SECONDS", "0"))
    late_s = float(os.environ.get("LATE_STEP_SECONDS", step_s))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    # every="auto" and snapshot_every="auto": the defaults; the watcher from SPOTSAFE_SOURCES
    run = spotsafe.Run(store, model=net, optimizer=opt, agree_every=1)
    for _ in run.epochs(3):
        for x, y in run.batches(loader):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()  # DDP's all-reduce: the ranks are at most a step apart
            opt.step()
            end = time.monotonic() + (step_s if run.step_count < 5 else late_s)
            while time.monotonic() < end:
                time.sleep(0.02)
            run.step()
            (out / f"step-r{rank}").write_text(str(run.step_count))
    run.finish()
    if rank == 0:
        torch.save(net.state_dict(), out / "weights.pt")
    finish()


if __name__ == "__main__":
    main()
