"""``python -m spotsafe.simulate aws|gcp|azure``: serve one simulator until stopped."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.environment import simulated_environment
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from spotsafe.rehearsal.simulators.server import Simulator

__all__ = ["main"]


_CONTROL_HINTS = {
    "aws": ("arm?action=terminate&delay=0", "rebalance", "disarm"),
    "gcp": ("preempt", "maintenance", "reset"),
    "azure": ("preempt?not_before_in=30", "clear"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``aws|gcp|azure [--port P] [--notice-after S]``: serve one simulator until stopped.

    ``python -m spotsafe.simulate`` (and ``spotsafe simulate``) also take ``rehearse ...``:
    :func:`spotsafe.rehearsal.cli.main` dispatches that to :mod:`spotsafe.rehearsal.rehearse`, which
    imports this module (never the other way round).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)

    parser = argparse.ArgumentParser(
        prog="python -m spotsafe.simulate",
        description="Serve a simulated cloud metadata endpoint on 127.0.0.1 for rehearsing preemptions. "
        "'rehearse ...' runs a full rehearsal (spotsafe.rehearsal.rehearse).",
    )
    sub = parser.add_subparsers(dest="provider", required=True, metavar="aws|gcp|azure|rehearse")
    for provider in ("aws", "gcp", "azure"):
        label = {
            "aws": "AWS EC2 instance metadata (IMDS)",
            "gcp": "GCE metadata server",
            "azure": "Azure Scheduled Events",
        }[provider]
        p = sub.add_parser(provider, help=f"simulate the {label}")
        p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
        p.add_argument(
            "--notice-after",
            type=float,
            default=None,
            metavar="S",
            help="the interruption notice appears S seconds after start",
        )
        p.add_argument("--duration", type=float, default=None, metavar="S", help="serve S seconds, then exit")
        if provider == "aws":
            p.add_argument("--action", choices=("terminate", "stop", "hibernate"), default="terminate")
            p.add_argument("--require-token", action="store_true", help="reject IMDSv1 requests (HttpTokens=required)")
    sub.add_parser("rehearse", help="run a full rehearsal (see python -m spotsafe.simulate rehearse --help)")
    args = parser.parse_args(args_list)

    sim: Simulator
    if args.provider == "aws":
        sim = AWSSimulator(
            port=args.port, notice_after=args.notice_after, action=args.action, require_token=args.require_token
        )
    elif args.provider == "gcp":
        sim = GCPSimulator(port=args.port, notice_after=args.notice_after)
    else:
        sim = AzureSimulator(port=args.port, notice_after=args.notice_after)

    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        with sim:
            for key, value in simulated_environment(sim).items():
                print(f"export {key}={value}")
            for hint in _CONTROL_HINTS[sim.name]:
                print(f'# curl -X POST "{sim.endpoint}/spotsafe/{hint}"')
            print(f"# curl {sim.endpoint}/spotsafe/state", flush=True)
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while not stop.wait(0.2):
                if deadline is not None and time.monotonic() >= deadline:
                    break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
