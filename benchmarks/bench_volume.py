"""Zone moves of the run's volume on the fakes: how long a move takes next to a same-zone attach.

    sudo python benchmarks/bench_volume.py [--sizes-mib 32 256] [--rounds 5] [--settle 0.3]

Runs against moto EC2 made EC2-faithful (tests/ec2faithful.py: atomic, zone-checked
attach; a snapshot copies its volume's backing file, a volume from a snapshot copies
the snapshot's) with loop devices as the volumes: root only. Each round, for each size,
with fresh volumes and the order of the contenders rotated:

- ``attach``: a volume in this instance's zone, detached from a stopped old instance;
- ``move``: the same data in another zone: claim (``--settle``), snapshot, copy, attach.

What it does not show: EC2's own snapshot time (minutes for a first snapshot of a large
volume, seconds for an increment after a periodic snapshot) and lazy loading of a
volume restored from a snapshot; on the fakes a snapshot is a sparse file copy.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spotsafe.cloud.aws.volume.filesystem import mount, unmount
from spotsafe.cloud.aws.volume.manager import VolumeManager
from spotsafe.cloud.aws.volume.model import Identity, Timeouts
from tests.ec2faithful import BlockStore, activate
from tests.ec2server import EC2Server, run_instance

REGION = "us-east-1"
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log


def _fill(store: BlockStore, ec2: Any, volume_id: str, az: str, mib: int, tmp: Path) -> None:
    iid = run_instance(ec2, az)
    ec2.attach_volume(VolumeId=volume_id, InstanceId=iid, Device="/dev/sdf")
    dev = store.device_of(volume_id)
    assert dev is not None
    mnt = tmp / f"fill-{volume_id}"
    mount(dev, str(mnt), mkfs=True)
    with open(mnt / "ckpt.bin", "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(chunk)
    unmount(str(mnt))
    ec2.stop_instances(InstanceIds=[iid])


def _one(ec2: Any, store: BlockStore, kind: str, mib: int, settle: float, tmp: Path) -> float:
    tag = {"spotsafe-run": f"bench-{kind}-{time.monotonic_ns()}"}
    data_az = "us-east-1a"
    here = data_az if kind == "attach" else "us-east-1b"
    vid = ec2.create_volume(
        AvailabilityZone=data_az,
        Size=max(1, mib >> 10),
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tag.items()]}],
    )["VolumeId"]
    _fill(store, ec2, vid, data_az, mib, tmp)
    iid = run_instance(ec2, here)
    mgr = VolumeManager(
        ec2,
        Identity(iid, here, REGION),
        timeouts=Timeouts(poll=0.05, settle=settle, force_detach_after=0.2, device=30),
        sys_root=store.sys_root(iid),
        dev_root=store.dev_root(iid),
    )
    t0 = time.perf_counter()
    a = mgr.attach(tags=tag, move=True)
    took = time.perf_counter() - t0
    mgr.detach(mgr.describe(a.volume.volume_id))
    if a.moved_from:
        mgr.retire_superseded(mgr.describe(a.volume.volume_id))
    ec2.delete_volume(VolumeId=a.volume.volume_id)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.3, help="claim settle time (production default 5 s)")
    ap.add_argument("--dir", default=".bench", help="where the backing files go")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, mount)", file=sys.stderr)
        return 2
    root = Path(args.dir).resolve() / f"volume-{os.getpid()}"
    server = EC2Server().start()
    ec2 = server.client("ec2")
    store = BlockStore(root / "bs", real=True, size_mb=max(args.sizes_mib) + 64)
    activate(store)
    times: dict[tuple[str, int], list[float]] = {}
    try:
        kinds = ["attach", "move"]
        for r in range(args.rounds):
            order = kinds[r % 2 :] + kinds[: r % 2]
            for mib in args.sizes_mib:
                for kind in order:
                    times.setdefault((kind, mib), []).append(_one(ec2, store, kind, mib, args.settle, root))
    finally:
        activate(None)
        store.close()
        server.shutdown()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"{'data MiB':>8} {'attach s':>9} {'move s':>9} {'move/attach':>11}  (medians of {args.rounds}; min-max)")
    for mib in args.sizes_mib:
        at, mv = times[("attach", mib)], times[("move", mib)]
        print(
            f"{mib:>8} {statistics.median(at):>9.2f} {statistics.median(mv):>9.2f} "
            f"{statistics.median(mv) / statistics.median(at):>11.1f}  "
            f"(attach {min(at):.2f}-{max(at):.2f}, move {min(mv):.2f}-{max(mv):.2f})"
        )
    print(f"claim settle {args.settle} s is inside every move (production default: 5 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
