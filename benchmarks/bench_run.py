"""What spotsafe.Run costs a training loop, and how fast a notice becomes a durable checkpoint.

    python benchmarks/bench_run.py [--repeats 5] [--steps 150] [--notices 5]

1. Overhead. The MNIST example's CNN and loop (batch 32, Adadelta, shuffled
   DataLoader, synthetic 28x28 data so no download is needed), run side by side in
   this process: the plain loop, and the same loop through ``spotsafe.Run`` with
   periodic async checkpoints to a local directory. The issue's setting is a save
   every 60 s; a benchmark run is much shorter, so ``every_seconds`` is scaled to
   about a sixth of the plain loop's duration (several saves per run: a harsher
   setting than one a minute). A third contender, the Run with no save due, shows
   its per-step cost alone. Repeats rotate which loop goes first; the figures
   are medians; the ratio is spotsafe throughput / plain throughput (>= 0.99 wanted).
2. Notice to durable. A real AWS metadata simulator on loopback posts a spot notice
   at a random moment while the loop trains; spotsafe's watcher (2 s polling) sees
   it, Run saves synchronously and reports the checkpoint durable. Printed: the
   median time from the notice appearing to the checkpoint being durable, its parts
   (detection, save), the bound "poll interval + save time", and the save time side
   by side with the hand-written peer, ``torch.save`` of the same state plus fsync.

Metadata sources are limited to the simulator and SIGTERM: nothing here probes a
real metadata address.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mnist_cnn_example", ROOT / "examples" / "mnist_cnn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EX = example()
TRAIN, _ = EX.synthetic(n_train=4096, n_test=32)


def setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, DataLoader[Any]]:
    torch.manual_seed(0)
    model = EX.Net()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.85)
    return model, opt, sched, DataLoader(TRAIN, batch_size=32, shuffle=True)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.item())


def plain(steps: int) -> tuple[float, float]:
    """Steps per second of the loop without spotsafe: (per wall-clock second, per CPU second)."""
    model, opt, sched, loader = setup()
    model.train()
    done = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while done < steps:
        for x, y in loader:
            train_step(model, opt, x, y)
            done += 1
            if done == steps:
                break
        sched.step()
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def with_run(steps: int, every_seconds: float, store: str) -> tuple[float, float, int]:
    """Steps per second through spotsafe.Run (saves awaited inside the timing): wall, CPU; saves made."""
    import spotsafe
    from spotsafe.cloud.watcher import InterruptionWatcher

    model, opt, sched, loader = setup()
    watcher = InterruptionWatcher(sources="signal", signals=()).start()
    run = spotsafe.Run(
        store, model=model, optimizer=opt, scheduler=sched, every_seconds=every_seconds, watch=watcher, keep_last=2
    )
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    stop = False
    saves, last = 0, None
    for _epoch in run.epochs(10**6):
        for x, y in run.batches(loader):
            loss = train_step(model, opt, x, y)
            run.step(loss=loss)
            if run._saved_step != last:
                saves, last = saves + 1, run._saved_step
            if run.step_count == steps:
                stop = True
                break
        if stop:
            break
        sched.step()
    run.checkpointer.wait()
    rate, cpu_rate = steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)
    run.close()
    watcher.stop()
    return rate, cpu_rate, saves


def bench_overhead(repeats: int, steps: int) -> dict[str, float]:
    plain(max(steps // 5, 10))  # warm up kernels and allocator
    estimate = statistics.median(plain(steps)[0] for _ in range(2))
    every = max(steps / estimate / 6, 0.2)
    print(
        f"[overhead] {steps} steps a run, batch 32, {repeats} repeats; spotsafe saves every {every:.2f} s "
        f"(scaled from 60 s: the plain run takes ~{steps / estimate:.1f} s)",
        flush=True,
    )
    rows: list[tuple[float, float, float, float, int]] = []
    bare: list[float] = []
    with tempfile.TemporaryDirectory(prefix="spotsafe-bench-") as tmp:
        for r in range(repeats):
            got: dict[str, Any] = {}
            order = ["plain", "run", "bare"]
            for which in order[r % 3 :] + order[: r % 3]:
                if which == "plain":
                    got["plain"] = plain(steps)
                elif which == "run":
                    got["run"] = with_run(steps, every, os.path.join(tmp, f"run{r}"))
                else:  # the Run's per-step cost alone: no periodic save due
                    got["bare"] = with_run(steps, 1e9, os.path.join(tmp, f"bare{r}"))
            (pw, pc), (rw, rc, saves), (bw, _, _) = got["plain"], got["run"], got["bare"]
            rows.append((pw, pc, rw, rc, saves))
            bare.append(bw / pw)
            print(
                f"  repeat {r + 1}: plain {pw:.1f} steps/s ({pc:.1f} per CPU s), spotsafe {rw:.1f} steps/s "
                f"({rc:.1f} per CPU s), {saves} saves; spotsafe without saves {bw:.1f} steps/s",
                flush=True,
            )
    wall = statistics.median(rw / pw for pw, _, rw, _, _ in rows)
    cpu = statistics.median(rc / pc for _, pc, _, rc, _ in rows)
    print(
        f"[overhead] median plain {statistics.median(r[0] for r in rows):.2f} steps/s, spotsafe.Run "
        f"{statistics.median(r[2] for r in rows):.2f} steps/s, {statistics.median(r[4] for r in rows):.0f} saves "
        f"a run",
        flush=True,
    )
    print(
        f"[overhead] throughput ratio spotsafe/plain (median of per-repeat ratios): wall-clock {wall:.3f}, "
        f"per CPU second {cpu:.3f} (want >= 0.99); without any save due {statistics.median(bare):.3f}",
        flush=True,
    )
    return {"ratio_wall": wall, "ratio_cpu": cpu, "every_seconds": every}


def torch_save_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def one_notice(sim: Any, tmp: str, trial: int, rng: random.Random) -> dict[str, float]:
    import spotsafe
    from spotsafe.cloud.watcher import InterruptionWatcher

    events = os.path.join(tmp, f"events{trial}.jsonl")
    os.environ["SPOTSAFE_EVENTS"] = events
    model, opt, sched, loader = setup()
    watcher = InterruptionWatcher(sources="aws", signals=()).start()
    run = spotsafe.Run(
        os.path.join(tmp, f"notice{trial}"),
        model=model,
        optimizer=opt,
        scheduler=sched,
        every_seconds=10**6,
        watch=watcher,
        exit_on_notice=False,
    )
    delay = rng.uniform(0.5, 2.5)  # a random phase of the 2 s polling cycle
    appeared = time.time() + delay
    sim.arm("terminate", delay=delay)
    for _epoch in run.epochs(10**6):
        for x, y in run.batches(loader):
            run.step(loss=train_step(model, opt, x, y))
        if run.should_stop:
            break
    sim.disarm()
    records = [json.loads(line) for line in Path(events).read_text().splitlines()]
    notice = next(e for e in records if e["event"] == "notice")
    durable = next(e for e in records if e["event"] == "durable")
    peer = torch_save_seconds(model, opt, os.path.join(tmp, f"peer{trial}.pt"))
    run.close()
    watcher.stop()
    return {
        "total": durable["time"] - appeared,
        "detect": notice["detected_at"] - appeared,
        "save": float(durable["seconds"]),
        "peer_save": peer,
        "poll": watcher.poll_interval,
    }


def bench_notice(repeats: int) -> dict[str, float]:
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    rng = random.Random(0)
    results = []
    with AWSSimulator() as sim, tempfile.TemporaryDirectory(prefix="spotsafe-bench-") as tmp:
        saved = {k: os.environ.get(k) for k in ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "SPOTSAFE_EVENTS")}
        os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = sim.endpoint
        try:
            for trial in range(repeats):
                r = one_notice(sim, tmp, trial, rng)
                results.append(r)
                print(
                    f"  notice {trial + 1}: durable {r['total']:.2f} s after it appeared "
                    f"(seen after {r['detect']:.2f} s, saved in {r['save']:.3f} s; torch.save {r['peer_save']:.3f} s)",
                    flush=True,
                )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(
        f"[notice] median notice-to-durable {med['total']:.2f} s (detection {med['detect']:.2f} s + "
        f"save {med['save']:.3f} s); bound poll interval + save = {med['poll'] + med['save']:.2f} s; "
        f"deadline 120 s",
        flush=True,
    )
    print(
        f"[notice] save time spotsafe {med['save']:.3f} s vs torch.save+fsync {med['peer_save']:.3f} s: "
        f"ratio {med['save'] / med['peer_save']:.2f}",
        flush=True,
    )
    return med


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--notices", type=int, default=5)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-notice", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier figures on a shared machine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Only the simulator and signals are ever asked: never a real metadata address.
    os.environ["SPOTSAFE_SOURCES"] = "aws,signal"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    if not args.skip_overhead:
        bench_overhead(args.repeats, args.steps)
    if not args.skip_notice:
        bench_notice(args.notices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
