"""The ``spotsafe`` command (``launch``, ``status``, ``down``, ``price``: see spotsafe/cloud/aws/launch/cli.py).

- ``spotsafe ls STORE``: the checkpoints in a store, newest last, with a quick
  integrity check (every file present with its size);
- ``spotsafe verify STORE [--step N]``: the same with every checksum and every tree
  decoded as ``load()`` would; exit status 1 when any checkpoint is damaged;
- exit status 2 (both): the store cannot be used (a missing directory, a bad URL, an
  unreachable bucket) or bad arguments, with one line naming the cause;
- ``spotsafe report STORE [-o report.html] [--json] [--serve]``: the run's story
  (launches, interruptions, redone steps, checkpoints, cost) from the store alone;
- ``spotsafe export STORE [--step N] [--key model] -o model.safetensors|model.pt``: a
  checkpoint's weights as a standard file (spotsafe/cli/export.py);
- ``spotsafe resume|volume|simulate|report|export|k8s|skypilot ...``: delegate to their modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    pass

from spotsafe import units
from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, FormatVersionError, SpotsafeError

#: Exit statuses of ``ls`` and ``verify``: 0 all good; 1 something damaged (verify) or the
#: asked-for step missing; 2 the store cannot be used (missing, a bad URL, unreachable) or bad arguments.
EXIT_DAMAGED = 1
EXIT_ERROR = 2

_DELEGATES = {
    "resume": ("spotsafe.resume", "supervise a training command: restart it until it finishes"),
    "volume": ("spotsafe.cloud.aws.volume.cli", "find, attach and mount the persistent EBS volume"),
    "report": ("spotsafe.story.cli", "the run's story from its store: HTML (-o), --json or --serve"),
    "export": ("spotsafe.cli.export", "a checkpoint's model weights as model.safetensors or a plain model.pt"),
    "simulate": (
        "spotsafe.rehearsal.cli",
        "serve a simulated AWS/GCP/Azure metadata endpoint; rehearse an interruption",
    ),
    "k8s": ("spotsafe.engines.k8s", "print a Kubernetes Job/JobSet for spot node pools (| kubectl apply -f -)"),
    "skypilot": ("spotsafe.engines.skypilot", "print a SkyPilot task file for sky jobs launch"),
}


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip(), file=out)


def _listing(store: str, *, full: bool, step: int | None, out: TextIO, storage_options: dict[str, Any]) -> int:
    from spotsafe.checkpoint.catalog import Catalog
    from spotsafe.checkpoint.completion import read_completion
    from spotsafe.checkpoint.manifest import CheckpointInfo, Manifest
    from spotsafe.storage.registry import open_store

    if not store.strip():
        raise ValueError("the store is empty: give a path or a URL (an empty path would be the current directory)")
    catalog = Catalog(open_store(store, storage_options=storage_options or None))
    try:
        root = catalog.store.local_dir
        if root is not None and not root.is_dir():
            if full:  # nothing to verify is not "all intact"
                print(
                    f"spotsafe verify: {catalog.store.url}: no such store (the directory does not exist)",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            print(f"{catalog.store.url}: no checkpoints (the directory does not exist)", file=out)
            return 0
        rows = [["NAME", "STEP", "EPOCH", "SIZE", "AGE", "REASON", "INTACT"]]
        bad = 0
        now = time.time()
        seen = 0
        for name, m in catalog.scan():
            if not isinstance(m, Manifest):
                if isinstance(m, CheckpointNotFound):
                    status = "no (incomplete: no manifest)"
                else:
                    status = f"no ({m})"
                if step is None:
                    rows.append([name, "-", "-", "-", "-", "-", status])
                    bad += 1
                continue
            if step is not None and m.step != step:
                continue
            seen += 1
            try:
                catalog.check(name, m, full=full)
                status = "yes (checksums)" if full else "yes (sizes)"
            except SpotsafeError as e:
                status = f"NO: {e}"
                bad += 1
            info = CheckpointInfo.from_manifest(catalog.store, name, m)
            rows.append(
                [
                    name,
                    str(info.step),
                    "-" if info.epoch is None else str(info.epoch),
                    units.size(info.size),
                    units.age(now - info.time.timestamp()),
                    info.reason,
                    status,
                ]
            )
        if step is not None and not seen:
            print(f"spotsafe: {catalog.store.url}: no committed checkpoint for step {step}", file=sys.stderr)
            return EXIT_DAMAGED
        if len(rows) == 1:
            print(f"{catalog.store.url}: no checkpoints", file=out)
        else:
            _table(rows, out)
        try:
            done = read_completion(catalog.store)
        except (CheckpointCorrupt, FormatVersionError) as e:
            print(f"spotsafe: completion record unreadable: {e}", file=sys.stderr)
            done = None
            bad += 1  # verify fails on it; ls reports it and goes on
        if done is not None:
            print(f"run complete at step {done.get('step')} ({done.get('time')})", file=out)
        # ls reports incomplete debris without failing; verify fails on anything damaged
        if full and bad:
            print(f"spotsafe verify: {bad} damaged or incomplete checkpoint(s) in {catalog.store.url}", file=sys.stderr)
            return EXIT_DAMAGED
        return 0
    finally:
        catalog.store.close()


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"spotsafe: --option wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _DELEGATES:
        module = importlib.import_module(_DELEGATES[args[0]][0])
        return int(module.main(args[1:]) or 0)
    parser = argparse.ArgumentParser(prog="spotsafe", description="Spot-interruption-proof PyTorch checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("ls", "list checkpoints (quick check: files present with their sizes)"),
        ("verify", "list checkpoints and verify every checksum; exit 1 if any is damaged"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("store", help="a path (the EBS mount) or a URL such as s3://bucket/run")
        p.add_argument(
            "--option",
            "-o",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="storage option for the filesystem (repeatable)",
        )
        if name == "verify":
            p.add_argument("--step", type=int, default=None, help="verify only this step")
    for name, (_module, helptext) in _DELEGATES.items():
        sub.add_parser(name, help=helptext, add_help=False)
    # -- launch, status, down, price: their parsers and logic live in spotsafe/cloud/aws/launch/cli.py
    from spotsafe.cloud.aws.launch import cli as _launch

    _launch.add_parsers(sub)
    ns = parser.parse_args(args)
    if ns.command in _launch.COMMANDS:
        return _launch.run_command(ns)
    # -- end launch
    try:
        return _listing(
            ns.store,
            full=ns.command == "verify",
            step=getattr(ns, "step", None),
            out=sys.stdout,
            storage_options=_options(ns.option),
        )
    except (SpotsafeError, ValueError, OSError) as e:
        print(f"spotsafe {ns.command}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
