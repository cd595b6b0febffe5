"""spotsafe.Run around a DDP loop; launched by torchrun (2 ranks) or as one plain process.

argv: OUT_DIR STORE_DIR NOTICE_STEP NOTICE_RANK [ddp|fsdp]   (NOTICE_STEP 0: no notice)

fsdp: the model is sharded with FSDP2 ``fully_shard`` (its state then goes through DCP).

Rank NOTICE_RANK alone gets a notice (watcher.trigger) at NOTICE_STEP. Every
rank logs the dataset indices it trains on (per epoch) and the Run's events;
rank 0 writes the final weights when the run completes.
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
from spotsafe.cloud.watcher import InterruptionWatcher

EPOCHS, SAMPLES, BATCH = 3, 48, 4


def main() -> None:
    out, store = Path(sys.argv[1]), sys.argv[2]
    notice_step, notice_rank = int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "ddp"
    out.mkdir(parents=True, exist_ok=True)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    tag = f"w{world}-r{rank}"
    os.environ["SPOTSAFE_EVENTS"] = str(out / f"events-{tag}.jsonl")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(SAMPLES, 6, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g), torch.arange(SAMPLES)
    )
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    if mode == "fsdp" and distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in (net[0], net[3]):
            fully_shard(layer)
        model = fully_shard(net)
    else:
        model = DistributedDataParallel(net) if distributed else net
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    watcher = InterruptionWatcher(sources="none", signals=()).start()
    run = spotsafe.Run(store, model=net, optimizer=opt, every_steps=5, watch=watcher, agree_every=1)
    seen = open(out / f"seen-{tag}.jsonl", "a")  # noqa: SIM115 - open for the whole run, closed at its end
    if run.resumed_from is not None:
        print(json.dumps({"resumed": run.step_count, "epoch": run.epoch, "batch": run.batch}), file=seen, flush=True)
    for epoch in run.epochs(EPOCHS):
        model.train()
        for x, y, idx in run.batches(loader):
            print(json.dumps({"epoch": epoch, "step": run.step_count + 1, "idx": idx.tolist()}), file=seen, flush=True)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if rank == notice_rank and run.step_count + 1 == notice_step:
                watcher.trigger("terminate", deadline_in=120)
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))  # keeps the job running while a test acts
            run.step()
    run.finish()
    watcher.stop()
    weights = net.state_dict()
    if mode == "fsdp" and distributed:
        weights = {k: v.full_tensor() for k, v in weights.items()}  # a collective: every rank
    if rank == 0:
        torch.save(weights, out / f"weights-{tag}.pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
