"""Seeded simulation: redone work plus checkpoint overhead, ``every="auto"`` against fixed intervals.

A job of ``--hours`` hours of training runs through interruptions that arrive as
a Poisson process at 5%, 10% and 20% per hour (the same seeded trace for every
policy). Each periodic checkpoint stalls training for the measured snapshot
stall and becomes durable the measured write time later; an interruption loses
the work done since the last *durable* checkpoint (the pessimistic case the
periodic interval exists for: a missed notice, a notice too short for the save,
a crash). ``auto`` is :class:`spotsafe.interval.AutoInterval` as a Run uses it:
the default prior rate, refined by the run's own history of interruptions, and
the measured save cost.

Costs: ``--measure`` measures them here with a real ``Checkpointer`` on the
benchmark's model-like state (``--scale 1``: 1 GiB in 352 tensors), on the disk
of ``--dir``; otherwise ``--stall``/``--write`` (seconds) are used.

Run: ``python benchmarks/sim_interval.py --measure [--scale 1] [--seeds 100] [--hours 100]``.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spotsafe.interval import AutoInterval, History

RATES = (0.05, 0.10, 0.20)
FIXED_MIN = (5, 10, 30)


@dataclass
class Outcome:
    redone_s: float
    overhead_s: float
    checkpoints: int
    interruptions: int


def simulate(
    interval: Callable[[], float],
    on_save: Callable[[float], None],
    on_interrupt: Callable[[float, int], None],
    rate_h: float,
    stall_s: float,
    write_s: float,
    job_s: float,
    rng: random.Random,
) -> Outcome:
    """One job through one interruption trace; ``interval()`` is asked before scheduling each checkpoint."""
    lam = rate_h / 3600.0
    t = progress = durable = 0.0
    pending: tuple[float, float] | None = None  # (progress saved, time it becomes durable)
    next_int = rng.expovariate(lam)
    next_ck = interval()
    out = Outcome(0.0, 0.0, 0, 0)
    while True:
        t_end = t + (job_s - progress)
        t_dur = pending[1] if pending is not None else math.inf
        ev = min(next_int, next_ck, t_dur, t_end)
        progress += ev - t
        t = ev
        if ev == t_end:
            return out
        if ev == next_int:
            out.redone_s += progress - durable
            out.interruptions += 1
            progress, pending = durable, None
            on_interrupt(t, out.interruptions)
            next_int = t + rng.expovariate(lam)
            next_ck = t + interval()
        elif ev == t_dur:
            assert pending is not None
            durable, pending = pending[0], None
            on_save(t)
        else:  # a checkpoint: the loop stalls for the snapshot
            if next_int < t + stall_s:  # interrupted during the stall: no checkpoint
                t = next_int
                out.redone_s += progress - durable
                out.interruptions += 1
                progress, pending = durable, None
                on_interrupt(t, out.interruptions)
                next_int = t + rng.expovariate(lam)
                next_ck = t + interval()
                continue
            t += stall_s
            out.overhead_s += stall_s
            out.checkpoints += 1
            pending = (progress, t + write_s)
            next_ck = t + interval()


def run_policy(name: str, rate_h: float, stall_s: float, write_s: float, job_s: float, seed: int) -> Outcome:
    rng = random.Random(seed * 1000 + int(rate_h * 1000))  # the same trace for every policy
    if name == "auto":
        policy = AutoInterval()
        clock = {"n": 0}

        def on_save(t: float) -> None:  # as Run: each landed save reports its cost and the hours trained so far
            policy.observe_history(History(t, clock["n"]))
            policy.observe_save(stall_s, write_s)

        def on_interrupt(t: float, n: int) -> None:  # as Run: a relaunch counts one interruption
            clock["n"] = n
            policy.observe_history(History(t, n))

        return simulate(lambda: policy.seconds, on_save, on_interrupt, rate_h, stall_s, write_s, job_s, rng)
    fixed = float(name.split()[0]) * 60.0
    return simulate(lambda: fixed, lambda t: None, lambda t, n: None, rate_h, stall_s, write_s, job_s, rng)


def measure(scale: float, directory: str, repeats: int = 5) -> tuple[float, float]:
    """Median snapshot stall and write+commit seconds of an async Checkpointer.save on the model-like state."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_checkpoint import build_state

    from spotsafe.checkpoint.writer import Checkpointer

    Path(directory).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sim-", dir=directory))
    try:
        state = {"model": build_state(scale)}
        stalls, writes = [], []
        with Checkpointer(work, keep_last=2) as ckpt:
            for step in range(repeats + 1):
                t0 = time.perf_counter()
                ckpt.save(step, state)
                stall = time.perf_counter() - t0
                ckpt.wait()
                if step:  # the first allocates the snapshot buffer
                    stalls.append(stall)
                    writes.append(ckpt.last_timings["write_s"] + ckpt.last_timings["commit_s"])
        return statistics.median(stalls), statistics.median(writes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="measure the save cost here (else --stall/--write)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / ".bench"))
    ap.add_argument("--stall", type=float, default=0.25, help="seconds the loop stalls per checkpoint")
    ap.add_argument("--write", type=float, default=2.0, help="seconds from the stall's end to durable")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--hours", type=float, default=100.0, help="training hours the job needs")
    args = ap.parse_args(argv)
    stall_s, write_s = measure(args.scale, args.dir) if args.measure else (args.stall, args.write)
    job_s = args.hours * 3600.0
    print(
        f"save cost: stall {stall_s:.3f} s, write {write_s:.3f} s ({'measured' if args.measure else 'given'}); "
        f"job {args.hours:g} h; {args.seeds} seeded traces per rate"
    )
    print()
    print("| interruptions/h | interval | redone work | checkpoint stall | total | checkpoints | interruptions |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rate in RATES:
        for name in ["auto", *(f"{m} min" for m in FIXED_MIN)]:
            outs = [run_policy(name, rate, stall_s, write_s, job_s, seed) for seed in range(args.seeds)]
            redone = [100 * o.redone_s / job_s for o in outs]
            over = [100 * o.overhead_s / job_s for o in outs]
            total = [r + o for r, o in zip(redone, over, strict=True)]
            label = f"**{name}**" if name == "auto" else name
            print(
                f"| {100 * rate:.0f}% | {label} | {statistics.mean(redone):.2f}% | {statistics.mean(over):.3f}% | "
                f"{statistics.mean(total):.2f}% ± {statistics.stdev(total):.2f} | "
                f"{statistics.mean(o.checkpoints for o in outs):.0f} | "
                f"{statistics.mean(o.interruptions for o in outs):.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
