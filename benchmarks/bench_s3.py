"""S3 throughput: spotsafe's S3Store against boto3 and s3fs, side by side, same server, same run.

Needs a disk-backed local S3 server, s3rver (Node.js), since moto re-reads whole
objects for ranged GETs and is no speed reference::

    mkdir -p /tmp/s3rver && npm install --prefix /tmp/s3rver s3rver   # or into ./node_modules (gitignored)
    python benchmarks/bench_s3.py --size-mib 1024 --repeats 3

What is compared, every contender once per round, in a rotated (Williams) order; each ratio
is taken within a round and its median printed with its spread:

- the server's own limits, the best any client can do against it: ``--size-mib`` of the same
  bytes as parallel raw PUTs / GETs of ``part_size`` objects at spotsafe's ``max_concurrency``,
  with no checksum and no payload signing (no hashing on the client), bodies built untimed;
- upload of a checkpoint: ``Checkpointer.save(step, {"w": tensor}, async_=False)``
  (the whole save: payload segments, xxh3 checksums, tree, manifest) vs boto3's
  ``upload_file`` with its defaults and tuned (``TransferConfig`` at the same concurrency and
  part size), vs s3fs's default ``put_file`` (all from a file in the page cache);
- download on resume: ``Checkpointer.load(step)`` (every checksum verified, tensors
  built) vs boto3's ``download_file``, default and tuned;
- for reference, one object through the store alone: ``S3Store.write_file``
  (multipart) and ``S3Store.read_file`` (ranged GETs).

Every upload goes to fresh keys (the round's objects are deleted after it, untimed).
Prints seconds, MiB/s and the throughput ratios (>1.0 means spotsafe is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
KEYS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1"}


def find_s3rver(explicit: str | None) -> str | None:
    candidates = [
        explicit,
        os.environ.get("S3RVER_BIN"),
        str(Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "s3rver"),
        "/tmp/s3rver/node_modules/.bin/s3rver",
        shutil.which("s3rver"),
    ]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3rver(binary: str, directory: Path, bucket: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--directory",
            str(directory),
            "--address",
            "127.0.0.1",
            "--port",
            str(port),
            "--silent",
            "--configure-bucket",
            bucket,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"s3rver exited with status {proc.returncode}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("s3rver did not start listening within 30 s")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3rver", help="path to the s3rver binary")
    parser.add_argument("--workdir", help="where s3rver keeps objects (default: a temp dir)")
    parser.add_argument("--part-size-mib", type=int, default=None, help="S3Store part_size (default: its own)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="S3Store max_concurrency")
    parser.add_argument("--skip-s3fs", action="store_true")
    args = parser.parse_args(argv)

    binary = find_s3rver(args.s3rver)
    if binary is None:
        print(
            "s3rver not found: mkdir -p /tmp/s3rver && npm install --prefix /tmp/s3rver s3rver (or set S3RVER_BIN)",
            file=sys.stderr,
        )
        return 2
    os.environ.update(KEYS)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

    import boto3
    import numpy as np
    import torch
    from bench_checkpoint import spread, williams_orders
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.storage.s3 import S3Store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="spotsafe-bench-s3-"))
    work.mkdir(parents=True, exist_ok=True)
    bucket = "bench"
    proc, endpoint = start_s3rver(binary, work / "s3rver", bucket)
    try:
        size = args.size_mib * MiB
        print(f"generating {args.size_mib} MiB of random data ...", flush=True)
        data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        view = memoryview(data).cast("B")
        src = work / "src.bin"
        src.write_bytes(view)
        dst = work / "dst.bin"

        opts: dict[str, Any] = {"endpoint_url": endpoint}
        if args.part_size_mib:
            opts["part_size"] = args.part_size_mib * MiB
        if args.max_concurrency:
            opts["max_concurrency"] = args.max_concurrency
        store = S3Store(f"s3://{bucket}/spotsafe", opts)
        # s3rver ignores If-None-Match; one writer only here, so the lease's exclusive create may be best effort.
        ckpt_opts = {**opts, "unsafe_no_conditional_writes": True}
        ckpt = Checkpointer(f"s3://{bucket}/ckpt", storage_options=ckpt_opts, keep_last=1)
        tensor = torch.from_numpy(data)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        fs = None
        if not args.skip_s3fs:
            import s3fs

            fs = s3fs.S3FileSystem(key="S3RVER", secret="S3RVER", client_kwargs={"endpoint_url": endpoint})

        # The server's own limits: parallel raw PUTs/GETs of part_size objects holding the same bytes,
        # at spotsafe's concurrency, no checksum and no payload signing (no hashing on the client).
        part, conc = store.part_size, store.max_concurrency
        raw_client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(
                max_pool_connections=conc + 4,
                retries={"total_max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path", "payload_signing_enabled": False},
            ),
        )
        bounds = [(i, min(i + part, size)) for i in range(0, size, part)]
        bodies = [bytes(view[a:b]) for a, b in bounds]  # built once, untimed: a raw PUT copies nothing
        pool = ThreadPoolExecutor(max_workers=conc)
        sink = memoryview(bytearray(size))

        def raw_put() -> None:
            list(
                pool.map(
                    lambda k: raw_client.put_object(Bucket=bucket, Key=f"raw/{k:05d}", Body=bodies[k]),
                    range(len(bounds)),
                )
            )

        def raw_get_one(k: int) -> None:
            a, b = bounds[k]
            body = raw_client.get_object(Bucket=bucket, Key=f"raw/{k:05d}")["Body"]
            fp = body._raw_stream._fp  # http.client's response: straight from the socket into the buffer
            pos = a
            while pos < b:
                n = fp.readinto(sink[pos:b])
                if not n:
                    raise SystemExit(f"raw GET of part {k} ended early")
                pos += n
            body.close()

        def raw_get() -> None:
            list(pool.map(raw_get_one, range(len(bounds))))

        tuned_cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc)
        tuned_client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(max_pool_connections=conc + 4)
        )

        def ckpt_save(step: int) -> None:
            ckpt.save(step, {"w": tensor}, async_=False)

        contenders: dict[str, Callable[[int], Any]] = {
            "raw PUTs (limit)": lambda step: raw_put(),
            "spotsafe save": ckpt_save,
            "boto3 upload_file (default)": lambda step: client.upload_file(str(src), bucket, "boto3/ckpt.bin"),
            "boto3 upload_file (tuned)": lambda step: tuned_client.upload_file(
                str(src), bucket, "tuned/ckpt.bin", Config=tuned_cfg
            ),
            "S3Store.write_file (1 object)": lambda step: store.write_file("ckpt.bin", [view]),
        }
        if fs is not None:
            contenders["s3fs put_file"] = lambda step: fs.put_file(str(src), f"{bucket}/s3fs/ckpt.bin")
        loaded: list[Any] = []
        downloads: dict[str, Callable[[int], Any]] = {
            "raw GETs (limit)": lambda step: raw_get(),
            "spotsafe load (verified)": lambda step: loaded.append(ckpt.load(step)),
            "boto3 download_file (default)": lambda step: client.download_file(bucket, "boto3/ckpt.bin", str(dst)),
            "boto3 download_file (tuned)": lambda step: tuned_client.download_file(
                bucket, "tuned/ckpt.bin", str(dst), Config=tuned_cfg
            ),
            "S3Store.read_file (1 object)": lambda step: store.read_file("ckpt.bin"),
        }
        results: dict[str, list[float]] = {}
        rounds: list[dict[str, float]] = []
        up_names, down_names = list(contenders), list(downloads)
        up_orders, down_orders = williams_orders(len(up_names)), williams_orders(len(down_names))
        for r in range(args.repeats):
            step = r + 1
            rounds.append({})
            for k in up_orders[r % len(up_orders)]:
                name = up_names[k]
                seconds = timed(partial(contenders[name], step))
                results.setdefault(name, []).append(seconds)
                rounds[-1][name] = seconds
                ckpt.wait()  # pruning runs in the background after a synchronous save: not part of the save
            for k in down_orders[r % len(down_orders)]:
                name = down_names[k]
                seconds = timed(partial(downloads[name], step))
                results.setdefault(name, []).append(seconds)
                rounds[-1][name] = seconds
                dst.unlink(missing_ok=True)
            if not torch.equal(loaded[-1]["w"], tensor) or bytes(sink) != bytes(view):
                raise SystemExit("a download differs from the bytes uploaded")
            loaded.clear()
            assert ckpt.last_saved is not None
            ckpt.store.delete_dir(ckpt.last_saved.name)
            for prefix in ("raw/", "boto3/", "tuned/", "s3fs/", "spotsafe/"):  # every upload goes to fresh keys
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                    for obj in page.get("Contents", ()):
                        client.delete_object(Bucket=bucket, Key=obj["Key"])
            print(f"repeat {r + 1}: " + ", ".join(f"{n} {t:.2f}s" for n, t in rounds[-1].items()), flush=True)
        pool.shutdown()

        mib = args.size_mib
        print()
        print(f"S3 throughput, {mib} MiB, s3rver on loopback, {args.repeats} rounds in rotated order")
        print(f"(S3Store part_size={part // MiB} MiB, max_concurrency={conc}; load average {os.getloadavg()[0]:.1f})")
        print(f"  {'measurement':32s} {'median s':>8s} {'MiB/s':>8s}  spread (min [q1 q3] max), s")
        for label, v in results.items():
            med = statistics.median(v)
            print(f"  {label:32s} {med:8.2f} {mib / med:8.1f}  {spread(v)}")

        def ratio(peer: str, ours: str) -> list[float]:
            return [r[peer] / r[ours] for r in rounds if peer in r and ours in r]

        print(
            "per-round throughput ratios (peer's time / spotsafe's: >= 1.0 means spotsafe is faster), median, spread:"
        )
        checks = [
            ("save / raw PUTs (the server's ingest)", ratio("raw PUTs (limit)", "spotsafe save"), 0.8),
            ("save / boto3 upload_file (tuned)", ratio("boto3 upload_file (tuned)", "spotsafe save"), 1.0),
            ("save / boto3 upload_file (default)", ratio("boto3 upload_file (default)", "spotsafe save"), 1.0),
            ("save / s3fs put_file", ratio("s3fs put_file", "spotsafe save"), 2.0),
            ("load / raw GETs (the server's egress)", ratio("raw GETs (limit)", "spotsafe load (verified)"), 0.8),
            (
                "load / boto3 download_file (tuned)",
                ratio("boto3 download_file (tuned)", "spotsafe load (verified)"),
                1.0,
            ),
            (
                "load / boto3 download_file (default)",
                ratio("boto3 download_file (default)", "spotsafe load (verified)"),
                1.0,
            ),
            ("write_file (1 object) / raw PUTs", ratio("raw PUTs (limit)", "S3Store.write_file (1 object)"), None),
            ("read_file (1 object) / raw GETs", ratio("raw GETs (limit)", "S3Store.read_file (1 object)"), None),
        ]
        for name, values, target in checks:
            if not values:
                continue
            value = statistics.median(values)
            verdict = "(report)" if target is None else f">= {target:<4} {'ok' if value >= target else 'MISSED'}"
            print(f"  {name:40s} {value:6.2f}  {verdict:14s} {spread(values)}")
        tuned_client.close()
        raw_client.close()
        ckpt.close()
        store.close()
        client.close()
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
