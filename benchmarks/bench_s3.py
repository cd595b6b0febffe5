"""S3 throughput: spotsafe's S3Store against boto3 and s3fs, side by side, same server, same run.

Needs a disk-backed local S3 server, s3rver (Node.js), since moto re-reads whole
objects for ranged GETs and is no speed reference::

    mkdir -p /tmp/s3rver && npm install --prefix /tmp/s3rver s3rver   # or into ./node_modules (gitignored)
    python benchmarks/bench_s3.py --size-mib 1024 --repeats 3

What is compared (medians of ``--repeats`` runs each, interleaved):

- upload of a 1 GiB checkpoint: ``Checkpointer.save(step, {"w": tensor}, async_=False)``
  (the whole save: payload segments, xxh3 checksums, tree, manifest) vs boto3's
  ``upload_file`` (default TransferManager) vs s3fs's default ``put_file`` (both from a
  file in the page cache);
- download on resume: ``Checkpointer.load(step)`` (every checksum verified, tensors
  built) vs boto3's ``download_file``;
- for reference, one object through the store alone: ``S3Store.write_file``
  (multipart) and ``S3Store.read_file`` (ranged GETs).

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
        ckpt = Checkpointer(f"s3://{bucket}/ckpt", storage_options=opts, keep_last=1)
        tensor = torch.from_numpy(data)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        fs = None
        if not args.skip_s3fs:
            import s3fs

            fs = s3fs.S3FileSystem(key="S3RVER", secret="S3RVER", client_kwargs={"endpoint_url": endpoint})

        results: dict[str, list[float]] = {
            "ckpt_save": [],
            "boto3_up": [],
            "s3fs_up": [],
            "store_up": [],
            "ckpt_load": [],
            "boto3_down": [],
            "store_down": [],
        }
        check = None
        for r in range(args.repeats):
            step = r + 1
            results["ckpt_save"].append(timed(lambda step=step: ckpt.save(step, {"w": tensor}, async_=False)))
            ckpt.wait()  # pruning runs in the background after a synchronous save: not part of the save
            loaded: list[Any] = []
            results["ckpt_load"].append(timed(lambda loaded=loaded, step=step: loaded.append(ckpt.load(step))))
            if not torch.equal(loaded[0]["w"], tensor):
                raise SystemExit("the loaded checkpoint differs from the saved one")
            loaded.clear()
            assert ckpt.last_saved is not None
            ckpt.store.delete_dir(ckpt.last_saved.name)
            results["store_up"].append(timed(lambda: store.write_file("ckpt.bin", [view])))
            results["boto3_up"].append(timed(lambda: client.upload_file(str(src), bucket, "boto3/ckpt.bin")))
            if fs is not None:
                results["s3fs_up"].append(timed(lambda: fs.put_file(str(src), f"{bucket}/s3fs/ckpt.bin")))
            out: list[memoryview] = []
            results["store_down"].append(timed(lambda out=out: out.append(store.read_file("ckpt.bin"))))
            if check is None:
                check = bool(np.array_equal(np.frombuffer(out[0], dtype=np.uint8), data))
                if not check:
                    raise SystemExit("downloaded bytes differ from the uploaded ones")
            out.clear()
            results["boto3_down"].append(timed(lambda: client.download_file(bucket, "boto3/ckpt.bin", str(dst))))
            dst.unlink(missing_ok=True)
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items() if v), flush=True)

        med = {k: statistics.median(v) for k, v in results.items() if v}
        mib = args.size_mib
        print()
        print(f"S3 throughput, {mib} MiB, s3rver on loopback, medians of {args.repeats}")
        print(f"(S3Store part_size={store.part_size // MiB} MiB, max_concurrency={store.max_concurrency})")
        for k, v in med.items():
            print(f"  {k:14s} {v:7.2f} s  {mib / v:8.1f} MiB/s")
        print("ratios (throughput, spotsafe / peer; >= 1.0 means spotsafe is faster):")
        print(f"  checkpoint save vs boto3 upload_file   : {med['boto3_up'] / med['ckpt_save']:.2f}x  (target >= 1.0)")
        if "s3fs_up" in med:
            print(
                f"  checkpoint save vs s3fs put_file       : {med['s3fs_up'] / med['ckpt_save']:.2f}x  (target >= 2.0)"
            )
        print(
            f"  checkpoint load vs boto3 download_file : {med['boto3_down'] / med['ckpt_load']:.2f}x  (target >= 1.0)"
        )
        print("  for reference, one object through S3Store alone:")
        print(f"    write_file (multipart) vs boto3 upload_file : {med['boto3_up'] / med['store_up']:.2f}x")
        if "s3fs_up" in med:
            print(f"    write_file (multipart) vs s3fs put_file     : {med['s3fs_up'] / med['store_up']:.2f}x")
        print(f"    read_file vs boto3 download_file            : {med['boto3_down'] / med['store_down']:.2f}x")
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
