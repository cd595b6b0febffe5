"""The MNIST CNN on several ranks with DistributedDataParallel, surviving spot interruptions.

    torchrun --standalone --nproc_per_node=2 examples/mnist_ddp.py --store /mnt/spotsafe/runs/ddp
    python -m spotsafe.resume --store s3://bucket/runs/ddp -- \\
        torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 examples/mnist_ddp.py
    python examples/mnist_ddp.py --store ...      # one process, no torchrun: resumes a DDP run too

``spotsafe.Run`` sees the initialized process group and then: a notice on any rank
(only the doomed instance gets one) is agreed by every rank at the same step over a
gloo group; every rank saves that step (rank 0 writes the model and optimizer, each
rank its own RNG and data position), the manifest is committed after a barrier,
and every rank exits 75. Resuming on a different number of ranks works: the model
and optimizer are replicated, rank r takes rank (r mod old world size)'s RNG, and
the interrupted epoch continues from the global number of samples already read
(see docs/distributed.md). With more than one instance, the store must be one every
instance reads (s3://..., or a shared file system), not a per-instance disk.

Data and model come from examples/mnist_cnn.py (``--data auto|mnist|digits|synthetic``).
The lines changed for spotsafe are marked ``# spotsafe``; the DDP lines ``# ddp``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_cnn import DEFAULT_EPOCHS, Net, evaluate, load_data

import spotsafe  # spotsafe


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MNIST CNN with DDP that survives spot interruptions (spotsafe example)")
    p.add_argument("--data", choices=["auto", "mnist", "digits", "synthetic"], default="auto")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--epochs", type=int, help=f"default: {DEFAULT_EPOCHS}")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=1.0, help="Adadelta learning rate")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--store", help="checkpoint store (default: $SPOTSAFE_STORE or ./checkpoints/mnist_ddp)")
    p.add_argument("--every-seconds", type=float, default=60.0)
    p.add_argument("--every-steps", type=int)
    p.add_argument("--save-weights", help="rank 0 writes the final model weights here (torch.save)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spotsafe.checkpoint").setLevel(logging.WARNING)
    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun  # ddp
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # ddp
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cpu")
    if distributed and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)
    if distributed and rank != 0:
        dist.barrier()  # rank 0 downloads MNIST first
    name, train_set, test_set = load_data(args.data, args.data_dir)
    if distributed and rank == 0:
        dist.barrier()
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[name]
    # DistributedSampler also on one process: the same permutation for every world
    # size, which is what lets a run resume on another number of ranks.  # ddp
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    test_loader = DataLoader(test_set, batch_size=500)

    net = Net().to(device)
    model = DistributedDataParallel(net) if distributed else net  # ddp
    optimizer = torch.optim.Adadelta(net.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.85)
    if rank == 0:
        print(
            f"data: {name} ({len(train_set)} train), {epochs} epochs, {world} rank(s), "
            f"batch size {args.batch_size} per rank",
            flush=True,
        )

    store = args.store or os.environ.get("SPOTSAFE_STORE") or "checkpoints/mnist_ddp"
    # The unwrapped module: its state_dict keys do not depend on DDP, so a DDP run
    # can resume in one process and the other way round.
    run = spotsafe.Run(
        store,
        model=net,
        optimizer=optimizer,
        scheduler=scheduler,  # spotsafe
        every_seconds=args.every_seconds,
        every_steps=args.every_steps,
    )
    if run.resumed_from is not None:
        print(
            f"rank {rank}: resumed from step {run.step_count} (epoch {run.epoch}, batch {run.batch}) "
            f"of a {run.resumed_from.world_size}-rank run",
            flush=True,
        )

    accuracy = 0.0
    for epoch in run.epochs(epochs):  # spotsafe
        model.train()
        for x, y in run.batches(train_loader):  # spotsafe
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            run.step(loss=loss.item())  # spotsafe: on a notice on ANY rank: every rank saves, exits 75
        scheduler.step()
        if rank == 0:
            _, accuracy = evaluate(net, test_loader)
            print(f"epoch {epoch + 1}/{epochs}: step {run.step_count}, test accuracy {100 * accuracy:.2f}%", flush=True)
    run.finish()  # spotsafe
    if rank == 0:
        if args.save_weights:
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, args.save_weights)
        print(f"done: {run.step_count} steps on {world} rank(s), test accuracy {100 * accuracy:.2f}%", flush=True)
    if distributed:
        dist.destroy_process_group()  # ddp
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
