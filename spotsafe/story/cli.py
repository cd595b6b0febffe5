"""``spotsafe report STORE``: the run's story, told from the store alone.

::

    spotsafe report s3://bucket/runs/gan -o report.html      # one self-contained HTML file
    spotsafe report s3://bucket/runs/gan --json              # the same facts as JSON
    spotsafe report /mnt/spotsafe/gan --serve                # a local page that refreshes itself

It reads the events every launch kept under ``events/`` (:mod:`spotsafe.story.events`),
the completion marker and the images under ``media/``, and never takes a writer's
lease or writes anything (except ``-o`` where asked). The HTML embeds plotly.js and
every image: it opens offline and fetches nothing at view time. ``--serve`` binds to
127.0.0.1 unless ``--host`` says otherwise, and also answers ``/metrics`` (Prometheus). The same store, or
a copy of it, gives the same bytes. The facts are :mod:`spotsafe.story.facts`, the
page :mod:`spotsafe.story.html`, the live page and the server :mod:`spotsafe.story.live`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from spotsafe.errors import SpotsafeError
from spotsafe.storage.base import Store
from spotsafe.storage.registry import open_store
from spotsafe.story.cost import Prices
from spotsafe.story.facts import StoreReport
from spotsafe.story.formats import count_text
from spotsafe.story.html import require_plotly
from spotsafe.story.live import build_page, make_server

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotsafe report",
        description="The run's story from its store: launches, interruptions, redone steps, checkpoints, cost.",
    )
    parser.add_argument("store", help="a path or URL such as s3://bucket/run")
    parser.add_argument("-o", "--output", help="write the HTML report here (default: report.html)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON instead of writing HTML")
    parser.add_argument("--serve", action="store_true", help="serve the report locally; the page refreshes itself")
    parser.add_argument("--port", type=int, default=8765, help="port for --serve (default 8765; 0: any free one)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address --serve binds to (default 127.0.0.1: this machine only; 0.0.0.0 shows the run's story, "
        "store URL and host names to anyone who can reach the port, without authentication)",
    )
    parser.add_argument("--refresh", type=float, default=30.0, help="seconds between page refreshes with --serve")
    parser.add_argument("--spot-price", type=float, help="USD per instance-hour of every launch")
    parser.add_argument(
        "--price", action="append", default=[], metavar="TYPE=USD", help="USD per hour of an instance type (repeatable)"
    )
    parser.add_argument("--on-demand-price", type=float, help="USD per hour on demand, to compare with")
    parser.add_argument(
        "--lookup-prices", action="store_true", help="ask EC2 DescribeSpotPriceHistory for each launch's spot price"
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="storage option (repeatable)"
    )
    return parser


def _prices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Prices | None:
    """The prices the flags give; None where none was given (the cost then has no dollars)."""
    for flag, value in (("--spot-price", args.spot_price), ("--on-demand-price", args.on_demand_price)):
        if value is not None and value < 0:
            parser.error(f"{flag} must be >= 0, not {value}")
    try:
        by_type = Prices.parse_type_prices(args.price)
    except ValueError as e:
        parser.error(str(e))
    if args.spot_price is not None or by_type or args.on_demand_price is not None or args.lookup_prices:
        return Prices(spot=args.spot_price, by_type=by_type, on_demand=args.on_demand_price)
    return None


def _storage_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--option wants KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def _serve(store: Store, args: argparse.Namespace, prices: Prices | None) -> int:
    require_plotly()
    server = make_server(store, host=args.host, port=args.port, refresh_seconds=args.refresh, prices=prices)
    port = server.server_address[1]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"spotsafe report: listening on {args.host}: anyone who can reach port {port} reads this run's story "
            "(no authentication; put it behind a proxy that has some)",
            file=sys.stderr,
        )
    print(
        f"spotsafe report: serving {store.url} at http://{args.host}:{port}/ and its metrics at /metrics "
        "(Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _report(store: Store, args: argparse.Namespace, prices: Prices | None) -> int:
    """The facts as JSON (``--json``), else the HTML page written to ``-o``."""
    report = StoreReport(store)
    if args.json:
        facts, _ = report.build(prices, lookup=args.lookup_prices)
        print(json.dumps(facts, indent=1, sort_keys=True))
        sys.stdout.flush()
        return 0
    output = args.output or "report.html"
    facts, _, page = build_page(report, prices, lookup=args.lookup_prices)
    with open(output, "w", encoding="utf-8") as f:
        f.write(page)
    print(
        f"spotsafe report: {output}: {len(facts['launches'])} launch(es), {len(facts['interruptions'])} "
        f"interruption(s), {count_text(facts['steps_lost'], facts['steps_lost_exact'])} step(s) redone, {'complete' if facts['complete'] else 'not complete'} "
        f"at step {facts['steps']}"
    )
    return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush at exit must not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (a test's capture): nothing to flush at exit
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    prices = _prices(parser, args)
    options = _storage_options(parser, args)
    try:
        store = open_store(args.store, storage_options=options or None)
    except (SpotsafeError, ValueError) as e:
        print(f"spotsafe report: {e}", file=sys.stderr)
        return 2
    try:
        return _serve(store, args, prices) if args.serve else _report(store, args, prices)
    except BrokenPipeError:  # `spotsafe report … --json | head`: the reader has what it wanted
        _quiet_stdout()
        return 0
    except (SpotsafeError, ValueError, OSError) as e:
        print(f"spotsafe report: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
