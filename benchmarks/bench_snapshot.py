"""What the in-memory snapshot cadence costs a training loop (target: <= 2% of step time).

    python benchmarks/bench_snapshot.py [--repeats 3] [--mnist-steps 400] [--big-steps 40] [--big-step-s 0.5]

Two loops, each run side by side through ``spotsafe.Run`` with snapshots off
(``snapshot_every=None``) and on (``"auto"``, the default), no periodic save due,
order rotated every repeat:

1. The MNIST example's CNN and loop (batch 32, Adadelta, synthetic data): real
   CPU training steps.
2. A 1 GiB model-like state (the checkpoint benchmark's 352 tensors) with a step
   of ``--big-step-s`` seconds during which the CPU waits, as it does for a GPU step.

Printed per loop: the median of per-repeat throughput ratios (on/off) and the
snapshot stall as a fraction of training time (the keeper's own accounting: the
seconds ``step()`` spent copying, over the loop's wall time), and the cadence
``auto`` chose.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import build_state
from bench_run import setup, train_step

import spotsafe


def mnist(snapshots: bool, steps: int, store: str) -> tuple[float, float, int, int, float]:
    model, opt, _sched, loader = setup()
    run = spotsafe.Run(
        store,
        model=model,
        optimizer=opt,
        every_steps=10**9,
        watch=False,
        snapshot_every="auto" if snapshots else None,
    )
    t0 = time.perf_counter()
    done = 0
    for _epoch in run.epochs(10**6):
        for x, y in run.batches(loader):
            train_step(model, opt, x, y)
            run.step()
            done += 1
            if done == steps:
                break
        if done == steps:
            break
    wall = time.perf_counter() - t0
    keeper = run.snapshots
    stall, every, taken = (keeper.stall_total_s, keeper.every, keeper.taken) if keeper else (0.0, 0, 0)
    first = keeper.first_stall_s if keeper else 0.0
    run.close()
    return steps / wall, stall / wall, every, taken, first / wall


class Big:
    """A stateful stand-in for a 1 GiB model: its tensors change a little every step."""

    def __init__(self) -> None:
        self.state = build_state(1.0)

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state = sd


def big(snapshots: bool, steps: int, step_s: float, store: str, model: Big) -> tuple[float, float, int, int, float]:
    run = spotsafe.Run(store, model=model, every_steps=10**9, watch=False, snapshot_every="auto" if snapshots else None)
    weights = next(iter(model.state.values()))
    t0 = time.perf_counter()
    for _ in range(steps):
        end = time.perf_counter() + step_s
        weights.add_(1.0)  # the "optimizer step"
        while time.perf_counter() < end:
            time.sleep(0.005)  # the CPU waits for the device
        run.step()
    wall = time.perf_counter() - t0
    keeper = run.snapshots
    stall, every, taken = (keeper.stall_total_s, keeper.every, keeper.taken) if keeper else (0.0, 0, 0)
    first = keeper.first_stall_s if keeper else 0.0
    run.close()
    return steps / wall, stall / wall, every, taken, first / wall


def compare(name: str, repeats: int, fn: Callable[[bool, str], tuple[float, float, int, int, float]]) -> None:
    ratios: list[float] = []
    fractions: list[float] = []
    steady: list[float] = []
    with tempfile.TemporaryDirectory(prefix="spotsafe-bench-", dir=".") as tmp:
        for r in range(repeats):
            got: dict[bool, tuple[float, float, int, int, float]] = {}
            for on in (False, True) if r % 2 == 0 else (True, False):
                got[on] = fn(on, f"{tmp}/{name}-{r}-{on}")
            (off_rate, _, _, _, _), (on_rate, frac, every, taken, first) = got[False], got[True]
            ratios.append(on_rate / off_rate)
            fractions.append(frac)
            steady.append(frac - first)
            print(
                f"  {name} repeat {r + 1}: off {off_rate:.2f} steps/s, on {on_rate:.2f} steps/s; "
                f"snapshot every {every} steps ({taken} taken), stall {100 * frac:.2f}% of wall time "
                f"({100 * (frac - first):.2f}% without the first, which allocates the buffer)",
                flush=True,
            )
    print(
        f"[{name}] throughput on/off (median of per-repeat ratios) {statistics.median(ratios):.3f} "
        f"(spread {min(ratios):.3f}-{max(ratios):.3f}); snapshot stall {100 * statistics.median(fractions):.2f}% "
        f"of training time, {100 * statistics.median(steady):.2f}% without the first snapshot (target <= 2%)",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mnist-steps", type=int, default=400)
    ap.add_argument("--big-steps", type=int, default=40)
    ap.add_argument("--big-step-s", type=float, default=0.5)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="spotsafe-warm-", dir=".") as tmp:
        mnist(False, 20, tmp)  # warm up kernels
    compare("mnist", args.repeats, lambda on, store: mnist(on, args.mnist_steps, store))
    model = Big()
    compare("1GiB", args.repeats, lambda on, store: big(on, args.big_steps, args.big_step_s, store, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
