"""One node's worker of an elastic multi-node job (tests/test_multinode.py).

argv: OUT_DIR STORE NODE

Launched by ``python -m spotsafe.resume -- torchrun --nnodes=MIN:MAX ... elastic.py``
on each "node" (one process per node, all on loopback), each node with its own AWS
metadata simulator in its environment. The Run watches it and SIGTERM as usual.

Every step is logged to ``OUT/seen-NODE.jsonl`` (time, world size, rank, the launch
it belongs to, the dataset indices). ``OUT/hold-NODE`` (lines of ``WORLD MINSTEPS MOD REM``)
makes the worker pause after a step, while its own watcher has no notice, once it has
taken MINSTEPS steps in this launch on a world of WORLD ranks, at a batch such that
the save a notice then causes lands on a batch number equal to REM modulo MOD (the
notice is acted on one step later on one rank, two with several: ``agree_every=1``),
so a test can choose world changes where the new world size does not divide the
global batch count.
It writes ``OUT/held-NODE`` when it starts waiting, so the test knows when to act.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import spotsafe

EPOCHS, SAMPLES, BATCH = 3, 72, 6  # 6 = 2 x 3: every re-split below leaves a remainder the new ranks share evenly


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(SAMPLES, 6, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g), torch.arange(SAMPLES)
    )


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def optimizer(net: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    out, store, node = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ["SPOTSAFE_EVENTS"] = str(out / f"events-{node}.jsonl")
    data = dataset()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    net = model()
    ddp = DistributedDataParallel(net) if world > 1 else net
    opt = optimizer(net)
    run = spotsafe.Run(store, model=net, optimizer=opt, every_steps=5, agree_every=1, keep_last=100)
    launch = {"pid": os.getpid(), "world": world, "rank": rank, "from": run.step_count}
    seen = open(out / f"seen-{node}.jsonl", "a")  # noqa: SIM115 - open for the whole run, closed at its end
    print(json.dumps({"launch": launch, "epoch": run.epoch, "batch": run.batch, "time": time.time()}), file=seen)
    seen.flush()
    hold_file, held = out / f"hold-{node}", out / f"held-{node}"
    taken = 0
    lead = 1 if world == 1 else 2
    for epoch in run.epochs(EPOCHS):
        for x, y, idx in run.batches(loader):
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            line = {"step": run.step_count + 1, "epoch": epoch, "batch": run.batch, "idx": idx.tolist()}
            print(json.dumps({**line, **launch, "time": time.time()}), file=seen, flush=True)
            run.step()
            taken += 1
            specs = [text.split() for text in hold_file.read_text().splitlines()] if hold_file.exists() else []
            for spec in specs:
                target = run.batch + lead
                rem = int(spec[3]) if len(spec) > 3 else 0
                if (
                    world != int(spec[0])
                    or taken < int(spec[1])
                    or target % int(spec[2]) != rem
                    or target > len(loader)
                ):
                    continue
                if run.watcher is None or run.watcher.notice is not None:
                    break
                held.write_text(json.dumps({"step": run.step_count, "world": world, "time": time.time()}))
                while hold_file.exists() and run.watcher.notice is None:
                    time.sleep(0.05)
                break
    run.finish()
    if rank == 0:
        torch.save(net.state_dict(), out / "weights.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
