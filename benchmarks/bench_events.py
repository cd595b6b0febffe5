"""What keeping the run's story (spotsafe.story.events) costs a training step.

    python benchmarks/bench_events.py [--rounds 7] [--seconds 3] [--step-ms 10]

Two measurements, each with the events on and off side by side in this process
(contenders interleaved, order rotated every round, a fresh store per contender):

1. A 10 ms step: a loop that busy-waits ``--step-ms`` (a stand-in for the GPU's
   work, precise where ``sleep`` is not) then calls ``run.step(loss=tensor, lr=...)``,
   for ``--seconds`` per contender and round. The events' writer flushes every
   second here (ten times more often than the default), so its JSON encoding and
   commits compete with the loop for the GIL as they would in a long run. Printed:
   the median over rounds of (steps/s off) / (steps/s on) - 1, i.e. the slowdown,
   with its spread.
2. The step() call alone: ``run.step`` in a tight loop with nothing due, events on
   and off; the difference in microseconds per call is the events' share of a step.

No metadata address is probed (``watch=False``; the identity probe is turned off).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no identity probe: nothing leaves the machine

import torch

import spotsafe
from spotsafe.story.events import EventLog


def make_run(root: Path, name: str, events: bool) -> spotsafe.Run:
    model = torch.nn.Linear(8, 8)
    run = spotsafe.Run(
        str(root / name),
        model=model,
        every_steps=10**9,
        every_seconds=10**9,
        watch=False,
        report_every=None,
    )
    if run.events is not None:
        run.events.close()
    # The Run's recorder writes its store channel to this log (or to none): the contender under test.
    run._recorder.events = EventLog(run.store, flush_every=1.0) if events else None
    if run.events is not None:
        run.events.record("launch", pid=os.getpid())
    return run


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def loop(run: spotsafe.Run, seconds: float, step_s: float) -> float:
    """Steps per second of a loop whose work takes ``step_s``."""
    loss = torch.tensor(0.5)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        busy(step_s)
        run.step(loss=loss, lr=0.1)
        n += 1
    return n / (time.perf_counter() - t0)


def call_cost(run: spotsafe.Run, n: int) -> float:
    """Microseconds per run.step() call with nothing else in the loop."""
    loss = torch.tensor(0.5)
    t0 = time.perf_counter()
    for _ in range(n):
        run.step(loss=loss, lr=0.1)
    return (time.perf_counter() - t0) / n * 1e6


def writer_cost(root: Path, steps: int, repeats: int = 20) -> float:
    """Milliseconds the writer thread spends per batch of ``steps`` sampled steps (JSON + one commit)."""
    from spotsafe.storage.local import LocalStore

    times = []
    with LocalStore(root / "writer") as store:
        log = EventLog(store, flush_every=3600)
        loss = torch.tensor(0.5)
        for r in range(repeats):
            for i in range(steps):
                log.step(r * steps + i + 1, {"loss": loss, "lr": 0.1})
            t0 = time.perf_counter()
            log.flush()
            times.append(time.perf_counter() - t0)
        log.close()
    return statistics.median(times) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--calls", type=int, default=200_000)
    args = p.parse_args()
    slowdowns: list[float] = []
    extra_us: list[float] = []
    with tempfile.TemporaryDirectory(prefix="spotsafe-bench-events-") as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            rates: dict[bool, float] = {}
            costs: dict[bool, float] = {}
            for on in order:
                run = make_run(root, f"r{r}-{'on' if on else 'off'}", on)
                try:
                    rates[on] = loop(run, args.seconds, args.step_ms / 1000)
                    costs[on] = call_cost(run, args.calls)
                finally:
                    run.close()
            slowdowns.append(rates[False] / rates[True] - 1)
            extra_us.append(costs[True] - costs[False])
            print(
                f"round {r + 1}: {args.step_ms:g} ms step: {rates[False]:.2f} vs {rates[True]:.2f} steps/s "
                f"(off/on), slowdown {slowdowns[-1] * 100:+.3f}%; step() alone: {costs[False]:.2f} vs "
                f"{costs[True]:.2f} us (+{extra_us[-1]:.2f} us)",
                flush=True,
            )
        # the default flush is every 10 s: 1,000 steps of 10 ms, all of them kept while the run is young
        writer_ms = writer_cost(root, steps=1000)
    med = statistics.median(slowdowns)
    med_us = statistics.median(extra_us)
    print(
        f"\nevents on a {args.step_ms:g} ms step: median slowdown {med * 100:+.3f}% "
        f"(rounds: {min(slowdowns) * 100:+.3f}% .. {max(slowdowns) * 100:+.3f}%), target < 1%"
    )
    print(
        f"events' share of one step() call: median +{med_us:.2f} us = {med_us / (args.step_ms * 1000) * 100:.3f}% "
        f"of a {args.step_ms:g} ms step (rounds: {min(extra_us):+.2f} .. {max(extra_us):+.2f} us)"
    )
    print(
        f"writer thread: {writer_ms:.1f} ms per flush of 1,000 steps' metrics (every 10 s by default: "
        f"{writer_ms / 10_000 * 100:.3f}% of the loop's time, off the training thread but sharing the GIL)"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
