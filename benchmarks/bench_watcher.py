"""Notice detection latency: from the moment the platform posts a notice to the moment
the training process knows, side by side with the usual hand-written watcher.

    python benchmarks/bench_watcher.py [--repeats 7] [--peer-interval 5]

For each provider a simulator (spotsafe.rehearsal.simulators, real HTTP on loopback) posts the
notice at a random phase of the polling cycle; spotsafe's InterruptionWatcher with
its defaults (2 s polling; GCP hanging GETs) and the peer, the loop the cloud docs
show and most training scripts, SkyPilot-style sidecars and custom scripts carry
(`GET` the notice endpoint every ``--peer-interval`` seconds, IMDSv2 token on AWS),
watch the *same* simulator at the same time. Prints the median latency of each and
the ratio spotsafe / peer (lower is better), plus SIGTERM-to-notice latency.
Every figure is a median over ``--repeats`` notices.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import requests

from spotsafe.cloud.aws.notices import AWSSource
from spotsafe.cloud.azure.notices import AzureSource
from spotsafe.cloud.gcp.notices import GCPSource
from spotsafe.cloud.notice import Source
from spotsafe.cloud.watcher import InterruptionWatcher
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator


class PeerLoop:
    """The hand-written watcher: poll the notice endpoint every ``interval`` seconds."""

    def __init__(self, check: Callable[[requests.Session], bool], interval: float) -> None:
        self.check = check
        self.interval = interval
        self.detected: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-loop", daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            session.trust_env = False
            while not self._stop.is_set():
                try:
                    if self.check(session):
                        self.detected = time.time()
                        return
                except requests.RequestException:
                    pass
                self._stop.wait(self.interval)

    def start(self) -> PeerLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def aws_check(sim: AWSSimulator) -> Callable[[requests.Session], bool]:
    def check(s: requests.Session) -> bool:
        token = s.put(
            sim.endpoint + "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, timeout=2
        ).text
        r = s.get(
            sim.endpoint + "/latest/meta-data/spot/instance-action",
            headers={"X-aws-ec2-metadata-token": token},
            timeout=2,
        )
        return r.status_code == 200

    return check


def gcp_check(sim: GCPSimulator) -> Callable[[requests.Session], bool]:
    def check(s: requests.Session) -> bool:
        r = s.get(
            f"http://{sim.host}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"}, timeout=2
        )
        return r.text.strip() == "TRUE"

    return check


def azure_check(sim: AzureSimulator) -> Callable[[requests.Session], bool]:
    def check(s: requests.Session) -> bool:
        r = s.get(
            sim.endpoint + "/metadata/scheduledevents",
            params={"api-version": "2020-07-01"},
            headers={"Metadata": "true"},
            timeout=2,
        )
        return any(e.get("EventType") == "Preempt" for e in r.json().get("Events", []))

    return check


def one_provider(
    name: str,
    sim_factory: Callable[[], AWSSimulator | GCPSimulator | AzureSimulator],
    source_factory: Callable[[object], Source],
    check_factory: Callable[[object], Callable[[requests.Session], bool]],
    post: Callable[[object], None],
    repeats: int,
    peer_interval: float,
    rng: random.Random,
) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    peer: list[float] = []
    for _ in range(repeats):
        with sim_factory() as sim:
            watcher = InterruptionWatcher([source_factory(sim)], signals=()).start()
            loop = PeerLoop(check_factory(sim), peer_interval).start()
            try:
                # post at a random phase of both polling cycles
                time.sleep(rng.uniform(0.5, 0.5 + max(watcher.poll_interval, peer_interval)))
                posted = time.time()
                post(sim)
                notice = watcher.wait(30)
                deadline = time.monotonic() + peer_interval + 5
                while loop.detected is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert notice is not None, f"{name}: spotsafe saw no notice"
                assert loop.detected is not None, f"{name}: the peer saw no notice"
                ours.append(notice.detected_at.timestamp() - posted)
                peer.append(loop.detected - posted)
            finally:
                loop.stop()
                watcher.stop()
    return ours, peer


def signal_latency(repeats: int) -> list[float]:
    out: list[float] = []
    for _ in range(repeats):
        with InterruptionWatcher("signal") as watcher:
            sent = time.time()
            os.kill(os.getpid(), signal.SIGTERM)
            notice = watcher.wait(5)
            assert notice is not None
            out.append(time.time() - sent)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--peer-interval", type=float, default=5.0, help="the peer's polling interval (AWS advises every 5 s)"
    )
    parser.add_argument("--providers", default="aws,gcp,azure")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.getLogger("spotsafe").setLevel(logging.ERROR)  # the notices are expected here
    rng = random.Random(args.seed)
    providers: dict[
        str,
        tuple[
            Callable[[], object],
            Callable[[object], Source],
            Callable[[object], Callable[[requests.Session], bool]],
            Callable[[object], None],
        ],
    ] = {
        "aws": (AWSSimulator, lambda s: AWSSource(s.endpoint), aws_check, lambda s: s.arm("terminate")),  # type: ignore[attr-defined]
        "gcp": (GCPSimulator, lambda s: GCPSource(s.host), gcp_check, lambda s: s.preempt()),  # type: ignore[attr-defined]
        "azure": (AzureSimulator, lambda s: AzureSource(s.endpoint), azure_check, lambda s: s.schedule_preempt()),  # type: ignore[attr-defined]
    }
    print(
        f"notice detection latency, median of {args.repeats}; spotsafe defaults (poll 2 s, GCP hanging GET) "
        f"vs a {args.peer_interval:g} s polling loop on the same simulator"
    )
    print(f"{'provider':<8} {'spotsafe s':>11} {'peer s':>8} {'ratio':>7}")
    for name in [p.strip() for p in args.providers.split(",") if p.strip()]:
        sim_f, src_f, chk_f, post = providers[name]
        ours, peer = one_provider(name, sim_f, src_f, chk_f, post, args.repeats, args.peer_interval, rng)  # type: ignore[arg-type]
        mo, mp = statistics.median(ours), statistics.median(peer)
        print(f"{name:<8} {mo:>11.3f} {mp:>8.3f} {mo / mp:>6.2f}x", flush=True)
    sig = signal_latency(args.repeats)
    print(f"{'sigterm':<8} {statistics.median(sig) * 1000:>9.3f}ms {'-':>8} {'-':>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
