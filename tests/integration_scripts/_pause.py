"""Test scaffolding shared by the integration scripts (not part of what a user writes).

``SPOTSAFE_TEST_PAUSE``: ``STEP:RANK[,STEP:RANK...]``. When RANK finishes optimizer step
STEP and ``OUT/reached-STEP-RANK`` does not exist yet (each pause happens in one launch
only), the script writes that file (holding its pid), then holds that rank until its
spotsafe watcher sees the notice the test sends (a SIGTERM, or the AWS simulator's).
So the notice lands mid-epoch at a known step on any machine, however loaded.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Pause:
    def __init__(self, out: Path, rank: int) -> None:
        spec = os.environ.get("SPOTSAFE_TEST_PAUSE", "")
        self.out, self.rank = out, rank
        self.steps = {int(s) for s, r in (p.split(":") for p in spec.split(",") if p) if int(r) == rank}

    def after_step(self, step: int, watcher: Any) -> None:
        marker = self.out / f"reached-{step}-{self.rank}"
        if step not in self.steps or marker.exists():
            return
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(marker)
        deadline = time.monotonic() + 180
        while watcher.notice is None and time.monotonic() < deadline:
            time.sleep(0.05)


class Fetches:
    """Records the dataset indices this process loads (to show skipped batches are not loaded)."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out / f"fetched-{os.getpid()}-r{rank}.json"
        self.indices: list[int] = []

    def add(self, i: int) -> None:
        self.indices.append(int(i))
        self.path.write_text(json.dumps(self.indices))
