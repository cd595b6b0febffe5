"""Test scaffolding shared by the integration scripts (not part of what a user writes).

``SPOTSAFE_TEST_PAUSE``: ``STEP:RANK``. The first launch (no ``OUT/paused`` marker yet)
writes ``OUT/reached-RANK`` (holding its pid) when RANK finishes optimizer step STEP,
then holds that rank until its spotsafe watcher sees the notice the test sends (a
SIGTERM, or the AWS simulator's). So the notice lands mid-epoch at a known point on
any machine, however loaded.
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
        self.step, self.pause_rank = (int(x) for x in spec.split(":")) if spec else (-1, -1)
        self.armed = bool(spec) and rank == self.pause_rank and not (out / "paused").exists()

    def after_step(self, step: int, watcher: Any) -> None:
        if not self.armed or step != self.step:
            return
        self.armed = False
        (self.out / "paused").write_text("")
        (self.out / f"reached-{self.rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 180
        while watcher.notice is None and time.monotonic() < deadline:
            time.sleep(0.05)


class Fetches:
    """Records the dataset indices a process loads (to show skipped batches are not loaded)."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out / f"fetched-{os.getpid()}-r{rank}.json"
        self.indices: list[int] = []

    def add(self, i: int) -> None:
        self.indices.append(int(i))
        if len(self.indices) % 8 == 0 or True:
            self.path.write_text(json.dumps(self.indices))
