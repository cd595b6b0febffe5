"""Synthetic run stories in a store, written as spotsafe's EventLog writes them (tests and benchmarks/bench_report.py).

:func:`write_story` writes ``launches`` launches of a run of ``steps`` steps with 4 metrics: every
launch but the last interrupted by a spot notice (its checkpoint durable, exit 75) or, every
``killed_every``-th, killed without a word (kill -9) and resumed from its last periodic
checkpoint; checkpoints every ``checkpoint_every`` steps with stall and persist times;
``images`` sample grids spread over the run under ``media/``. The step events are kept the
way :meth:`spotsafe.story.events.EventLog.step` keeps them (every step up to 1,000, then every
2nd, 4th, ...; ``dense=True``: every step, as a store written by another tool might hold).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spotsafe.story.events import EVENTS_DIR, EVENTS_FORMAT, EVENTS_FORMAT_VERSION, stride

#: Events per object, as the writer splits them (spotsafe.story.events.MAX_EVENTS_PER_OBJECT).
MAX_EVENTS_PER_OBJECT = 20_000

T0 = 1_790_000_000.0
STEP_S = 0.05


def launch_id(t: float, i: int) -> str:
    dt = datetime.fromtimestamp(t, timezone.utc)
    return f"{dt:%Y%m%dT%H%M%S}{dt.microsecond // 1000:03d}Z-{i:08x}"


def png(seed: int, size: int = 16) -> bytes:
    """A small grey PNG (valid: signature, IHDR, IDAT, IEND), different per seed."""
    import zlib

    raw = b"".join(b"\x00" + bytes(((seed * 7 + x + y) % 256) for x in range(size)) for y in range(size))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = size.to_bytes(4, "big") + size.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _write_objects(root: Path, lid: str, events: list[dict[str, Any]]) -> None:
    (root / EVENTS_DIR).mkdir(parents=True, exist_ok=True)
    for seq, lo in enumerate(range(0, len(events), MAX_EVENTS_PER_OBJECT)):
        doc = {
            "format": EVENTS_FORMAT,
            "format_version": EVENTS_FORMAT_VERSION,
            "launch": lid,
            "seq": seq,
            "events": events[lo : lo + MAX_EVENTS_PER_OBJECT],
        }
        (root / EVENTS_DIR / f"{lid}-{seq:06d}.json").write_text(json.dumps(doc, separators=(",", ":")))


def _kept(step: int, dense: bool) -> bool:
    return dense or step % stride(step) == 0


def write_story(
    root: Path,
    *,
    launches: int,
    steps: int,
    images: int = 0,
    checkpoint_every: int = 1000,
    killed_every: int = 4,
    dense: bool = False,
) -> dict[str, Any]:
    """Write the story into the local store at ``root``; what it holds (for a test's expectations)."""
    root.mkdir(parents=True, exist_ok=True)
    per_launch = math.ceil(steps / launches)
    image_steps = {round(i * (steps - 1) / max(images - 1, 1)) + 1 for i in range(images)}
    t = T0
    resumed = 0
    redone_total = 0
    reached_before = 0
    kills = 0
    for i in range(launches):
        lid = launch_id(t, i)
        evs: list[dict[str, Any]] = [
            {
                "kind": "launch",
                "time": t,
                "pid": 1000 + i,
                "process_started": t - 2,
                "store": str(root),
                "world_size": 1,
            },
            {"kind": "instance", "time": t + 0.1, "host": f"ip-10-0-0-{i % 250}", "instance_type": "g5.xlarge"},
            {"kind": "restore", "time": t + 1, "step": resumed, "epoch": 0, "batch": 0, "seconds": 0.5},
        ]
        redone_total += max(0, reached_before - resumed) if i else 0
        t += 1
        last = steps if i == launches - 1 else min(steps, resumed + per_launch + 37)
        killed = i < launches - 1 and killed_every and (i + 1) % killed_every == 0
        last_ckpt = resumed
        for s in range(resumed + 1, last + 1):
            t += STEP_S
            if _kept(s, dense) or s == resumed + 1:
                ev: dict[str, Any] = {
                    "kind": "step",
                    "time": t,
                    "step": s,
                    "epoch": s // 10_000,
                    "metrics": {
                        "loss": 1 / math.sqrt(s),
                        "acc": 1 - 1 / math.sqrt(s),
                        "lr": 0.1,
                        "grad": (s % 97) / 97,
                    },
                }
                if s == resumed + 1:
                    ev["first"] = True
                evs.append(ev)
            if s % checkpoint_every == 0:
                evs.append(
                    {"kind": "checkpoint", "time": t, "step": s, "epoch": s // 10_000, "reason": "periodic"}
                    | {"stall_s": 0.004 + (s % 7) / 1000, "persist_s": 0.8 + (s % 5) / 10, "bytes": 50 << 20}
                    | {"durable": True}
                )
                last_ckpt = s
            if s in image_steps:
                path = f"media/samples-{s:012d}.png"
                (root / "media").mkdir(exist_ok=True)
                data = png(s)
                (root / path).write_bytes(data)
                evs.append({"kind": "image", "time": t, "tag": "samples", "path": path, "step": s, "bytes": len(data)})
        if i == launches - 1:
            evs.append({"kind": "exit", "time": t + 1, "status": "complete", "code": 0, "step": last})
        elif killed:
            kills += 1
            evs.append({"kind": "progress", "time": t, "step": last})
        else:
            evs.append({"kind": "notice", "time": t, "step": last, "source": "aws", "action": "terminate"})
            evs[-1] |= {"detected_at": t, "deadline": t + 120}
            evs.append({"kind": "checkpoint", "time": t + 0.1, "step": last, "reason": "notice", "stall_s": 0.2})
            evs[-1] |= {"persist_s": 1.5, "bytes": 50 << 20, "durable": True}
            evs.append({"kind": "durable", "time": t + 2, "step": last, "seconds": 2.0, "flushed": True, "left": 118.0})
            evs.append({"kind": "exit", "time": t + 2.5, "status": "preempted", "code": 75, "step": last})
            last_ckpt = last
        _write_objects(root, lid, evs)
        reached_before = max(reached_before, last)
        resumed = last_ckpt
        t += 90  # the next instance boots
    return {"steps_redone": redone_total, "kills": kills, "interruptions": launches - 1}
