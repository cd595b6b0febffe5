"""Costs spotsafe adds to a torchrun job (2 ranks, gloo, CPU).

    python benchmarks/bench_distributed.py [--steps 150] [--repeats 5] [--width 1024]
    python benchmarks/bench_distributed.py --save [--mib 256] [--repeats 3]

Default: the notice agreement's cost per step.

Launches itself with ``torchrun --standalone --nproc_per_node=2``. Each rank
trains a small DDP MLP; the same loop runs without agreement, with the async
agreement every step (spotsafe's default), with a synchronous one every step,
and async every 10 steps, interleaved over several repeats. Prints the median
step time of each and its overhead against the loop without agreement, and the
bound on steps (and seconds) between a notice on one rank and every rank acting.

``--save``: the training stall of a periodic checkpoint of a DDP model (``--mib`` of
parameters + as much SGD momentum) through ``spotsafe.Run`` (async: rank 0 copies
into a reusable buffer and writes in the background; sync: the step waits for the
write), against ``torch.distributed.checkpoint.async_save`` of the same state as the
peer, medians of ``--repeats``, each followed by waiting for the write to land.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from spotsafe.distributed.agreement import NoticeAgreement
    from spotsafe.distributed.context import DistContext

    dist.init_process_group("gloo")
    ctx = DistContext.detect()
    assert ctx is not None
    torch.manual_seed(0)
    w = args.width
    model = DDP(
        torch.nn.Sequential(
            torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, 10)
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, w), torch.randint(0, 10, (64,))

    every: dict[str, int] = {}

    def loop(mode: str) -> tuple[float, float]:
        agreement = None
        if mode == "async-1":
            agreement = NoticeAgreement(ctx, every=1, async_=True)
        elif mode == "sync-1":
            agreement = NoticeAgreement(ctx, every=1, async_=False)
        elif mode == "async-10":
            agreement = NoticeAgreement(ctx, every=10, async_=True)
        elif mode == "auto":
            agreement = NoticeAgreement(ctx, every="auto", interval=args.interval)
        dist.barrier()
        inside = 0.0
        t = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if agreement is not None:
                a = time.perf_counter()
                agreement.step(None)
                inside += time.perf_counter() - a
        if agreement is not None:
            agreement.drain()
            every[mode] = agreement.every
        return (time.perf_counter() - t) / args.steps, inside / args.steps

    modes = ["none", "async-1", "sync-1", "async-10", "auto"]
    loop("none")  # warm up
    times: dict[str, list[float]] = {m: [] for m in modes}
    inside: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            step, call = loop(m)
            times[m].append(step)
            inside[m].append(call)
    if ctx.rank == 0:
        print(
            json.dumps(
                {m: [statistics.median(times[m]), statistics.median(inside[m]), every.get(m, 0)] for m in modes}
            ),
            flush=True,
        )
    dist.destroy_process_group()


def save_worker(args: argparse.Namespace) -> None:
    import tempfile

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.nn.parallel import DistributedDataParallel as DDP

    import spotsafe

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    n = int((args.mib * 2**20 / 4) ** 0.5)
    torch.manual_seed(0)
    net = torch.nn.Linear(n, n, bias=False)
    model = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, n)
    model(x).sum().backward()
    opt.step()  # momentum buffers exist
    root = args.dir or tempfile.mkdtemp(prefix="spotsafe-bench-")
    box = [root]
    dist.broadcast_object_list(box, src=0)
    root = box[0]
    results: dict[str, list[float]] = {"spotsafe async": [], "spotsafe sync": [], "dcp async_save": []}
    for r in range(args.repeats):
        for mode in results:
            store = f"{root}/{mode.replace(' ', '-')}-{r}"
            dist.barrier()
            if mode.startswith("spotsafe"):
                run = spotsafe.Run(
                    store,
                    model=net,
                    optimizer=opt,
                    every_steps=1,
                    watch=False,
                    async_=mode.endswith("async"),
                    agree_every=1,
                )
                model(x).sum().backward()
                opt.step()
                t = time.perf_counter()
                run.step()  # saves: the stall the loop sees
                stall = time.perf_counter() - t
                run.close()  # waits for the write to land
            else:
                sd = {"model": net.state_dict(), "optim": opt.state_dict()}
                t = time.perf_counter()
                fut = dcp.async_save(sd, checkpoint_id=store)
                stall = time.perf_counter() - t
                fut.result()  # type: ignore[union-attr]
            results[mode].append(stall)
            dist.barrier()
    if rank == 0:
        print(json.dumps({m: statistics.median(v) for m, v in results.items()}), flush=True)
        if not args.dir:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--interval", type=float, default=0.5, help="auto mode's target seconds between agreements")
    p.add_argument("--save", action="store_true", help="measure the stall of a checkpoint instead")
    p.add_argument("--mib", type=int, default=256, help="--save: MiB of parameters (as much again of momentum)")
    p.add_argument("--dir", help="--save: where to write (default: a temp dir)")
    args = p.parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        (save_worker if args.save else worker)(args)
        return 0
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            f"--steps={args.steps}",
            f"--repeats={args.repeats}",
            f"--width={args.width}",
            f"--interval={args.interval}",
            f"--mib={args.mib}",
        ]
        + (["--save"] if args.save else [])
        + ([f"--dir={args.dir}"] if args.dir else [])
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    med = json.loads(lines[-1])
    if args.save:
        peer = med["dcp async_save"]
        print(
            f"2 ranks, gloo on CPU, DDP model of {args.mib} MiB + {args.mib} MiB momentum; "
            f"training stall of one checkpoint, median of {args.repeats}"
        )
        for mode, t in med.items():
            print(f"{mode:<16} {t * 1e3:9.1f} ms   {t / peer:6.2f}x dcp async_save")
        return 0
    base = med["none"][0]
    print(f"2 ranks, gloo on CPU, DDP MLP width {args.width}, batch 64; median of {args.repeats} x {args.steps} steps")
    print("in-call: time the training thread spends inside NoticeAgreement.step, per step, / step time")
    print(f"{'mode':<10} {'step ms':>9} {'vs none':>9} {'in-call us':>11} {'in-call %':>10}  bound (steps)")
    for mode, (t, call, every) in med.items():
        if mode == "none":
            bound = "-"
        elif mode == "sync-1":
            bound = "0"
        else:
            bound = str(2 * every - 1)
        print(f"{mode:<10} {t * 1e3:9.2f} {t / base:8.3f}x {call * 1e6:11.1f} {100 * call / base:9.3f}%  {bound}")
    auto_every = med["auto"][2]
    print(
        f"auto settled on every={auto_every}: a notice on one rank reaches every rank within "
        f"{2 * auto_every - 1} steps = {(2 * auto_every - 1) * base:.2f} s here "
        "(+ the watcher's poll interval, 2 s by default); the 30 s budget leaves the rest for the save"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
