"""What telling a run's story costs: `spotsafe report` on synthetic stores, and the live page inside training.

    python benchmarks/bench_report.py [--quick] [--dense] [--live-seconds 40] [--rounds 3]

1. **Render.** Stores written by ``tests/story_stores.py`` as spotsafe's EventLog writes them
   (every step's metrics kept up to step 1,000, then every 2nd, 4th, ...: a run of 10^6
   steps keeps ~6,000 step events), 4 metrics, a checkpoint every 1,000 steps, 500 sample
   images, for 1 / 10 / 101 launches (101 launches: 100 interruptions, a quarter of them
   kill -9) and 10^4 / 10^6 steps. Each case runs ``spotsafe report STORE -o report.html``
   in a fresh process: printed are the time from the call to the file written (reading,
   facts, page; not the interpreter's start), the process's peak RSS (imports included)
   and the HTML's size; with it the process's CPU time (on a shared machine the wall time is
   mostly waiting for a CPU). ``--dense`` adds stores that hold *every* step's event (as another
   writer might): 10^5 and 10^6 step events.
2. **The live page's cost inside training.** A 10 ms step (a busy-wait holding the GIL, the
   worst case for a background thread) with and without a :class:`LivePage` rebuilding the
   101-launch, 10^6-step page every 10 s (30 times the default ``report_every=300``),
   interleaved rounds, order rotated. Printed: the slowdown at 10 s and what it is at the
   default 300 s (the thread is idle between pages, so the cost scales with 1/interval);
   then the CPU time one page takes on its thread, which bounds what it can take from the
   loop per interval whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.story_stores import write_story  # noqa: E402

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from spotsafe.cli.main import main
import plotly.graph_objects  # imported before the clock: the interpreter's start is not the report's
t1, c1 = time.perf_counter(), time.process_time()
code = main(["report", sys.argv[1], "-o", sys.argv[2]])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"code": code, "import_s": t1 - t0, "render_s": t2 - t1, "cpu_s": c2 - c1,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def render_case(tmp: Path, launches: int, steps: int, *, dense: bool = False) -> dict[str, float]:
    store = tmp / f"store-{launches}-{steps}-{int(dense)}"
    write_story(store, launches=launches, steps=steps, images=500, dense=dense)
    out = tmp / "report.html"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true"}
    got = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(out)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(got.stdout.strip().splitlines()[-1])
    result["html_mb"] = out.stat().st_size / 1e6
    events = sum(len(json.loads(p.read_text())["events"]) for p in (store / "events").iterdir())
    result["events"] = events
    shutil.rmtree(store)
    return result


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def loop_rate(seconds: float, step_s: float) -> float:
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        busy(step_s)
        n += 1
    return n / (time.perf_counter() - start)


def live_cost(tmp: Path, seconds: float, rounds: int, every: float) -> None:
    from spotsafe.storage.local import LocalStore
    from spotsafe.story.live import LivePage

    store_dir = tmp / "live"
    write_story(store_dir, launches=101, steps=10**6, images=500)
    if seconds > 0:
        loop_ab(store_dir, seconds, rounds, every)
    # The bound that does not depend on the machine's other load: the CPU a page takes (the GIL is held
    # at most that long). The first page reads every object; later ones only the new (objects never change).
    page = LivePage(LocalStore(store_dir), every=300)
    cpu = []
    for _ in range(4):
        t0 = time.process_time()
        assert page.refresh(), page.last_error
        cpu.append(time.process_time() - t0)
    first, steady = cpu[0], statistics.median(cpu[1:])
    print(
        f"\nlive page of 101 launches, 10^6 steps, 500 images: CPU {first:.2f} s for the first page, "
        f"{steady:.2f} s for each later one (median of 3)"
    )
    print(
        f"  share of the loop at report_every=300 s: at most {first / 300 * 100:.2f}% for the first, "
        f"{steady / 300 * 100:.3f}% after; at {every:g} s: {steady / every * 100:.2f}%"
    )


def loop_ab(store_dir: Path, seconds: float, rounds: int, every: float) -> None:
    from spotsafe.storage.local import LocalStore
    from spotsafe.story.live import LivePage

    rates: dict[str, list[float]] = {"off": [], "live": []}
    pages = 0
    for r in range(rounds):
        for name in ["off", "live"] if r % 2 == 0 else ["live", "off"]:
            store = LocalStore(store_dir)
            page = None
            if name == "live":
                page = LivePage(store, every=every, first_after=1.0)
                page.start_thread()
            rates[name].append(loop_rate(seconds, 0.010))
            if page is not None:
                page.close()
                pages += page.written
                assert page.last_error is None, page.last_error
            store.close()
    slow = [off / live - 1 for off, live in zip(rates["off"], rates["live"], strict=True)]
    med = statistics.median(slow)
    print(
        f"\nlive page every {every:g} s inside a 10 ms loop (101 launches, 10^6 steps, 500 images; "
        f"{pages} pages in {rounds} rounds of {seconds:g} s):"
    )
    print(f"  steps/s off {statistics.median(rates['off']):.1f}, with the page {statistics.median(rates['live']):.1f}")
    print(f"  slowdown {med * 100:+.2f}% (rounds: {', '.join(f'{s * 100:+.2f}%' for s in slow)})")
    print(f"  at the default report_every=300 s: {med * every / 300 * 100:+.3f}% of the loop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 101-launch, 10^6-step render")
    parser.add_argument("--dense", action="store_true", help="also stores with every step's event (10^5, 10^6)")
    parser.add_argument(
        "--live-seconds", type=float, default=40.0, help="seconds per contender of the loop A/B (0: only the CPU)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between live pages in part 2")
    args = parser.parse_args()
    cases = [(101, 10**6, False)] if args.quick else [(n, s, False) for s in (10**4, 10**6) for n in (1, 10, 101)]
    if args.dense:
        cases += [(101, 10**5, True), (101, 10**6, True)]
    with tempfile.TemporaryDirectory(prefix="spotsafe-bench-report-") as d:
        tmp = Path(d)
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} on {os.cpu_count()} CPUs (render s is wall time; CPU s the process's own)")
        print(
            f"{'launches':>8} {'steps':>9} {'events':>8} {'render s':>9} {'CPU s':>6} {'peak RSS MiB':>13} "
            f"{'HTML MB':>8}"
        )
        for launches, steps, dense in cases:
            r = render_case(tmp, launches, steps, dense=dense)
            assert r["code"] == 0, r
            label = f"{steps:.0e}" + (" dense" if dense else "")
            print(
                f"{launches:>8} {label:>9} {r['events']:>8} {r['render_s']:>9.2f} {r['cpu_s']:>6.2f} {r['rss_mib']:>13.0f} "
                f"{r['html_mb']:>8.2f}",
                flush=True,
            )
        live_cost(tmp, args.live_seconds, args.rounds, args.every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
