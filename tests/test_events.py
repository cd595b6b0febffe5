"""Events kept in the store: immutable objects under events/, read back from local, S3 and the mirror."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.cli.main import main as cli_main
from spotsafe.errors import FormatVersionError, StoreError
from spotsafe.storage.base import Store
from spotsafe.storage.local import LocalStore
from spotsafe.storage.mirror import MirrorStore
from spotsafe.storage.registry import open_store
from spotsafe.story.events import (
    DENSE_STEPS,
    EVENTS_DIR,
    EventLog,
    EventReader,
    new_launch_id,
    png_bytes,
    process_start_time,
    read_events,
    stride,
)
from tests.helpers import wait_until


def _story(store: Store, *, flush_every: float = 3600.0) -> tuple[str, list[str]]:
    """One launch's worth of events, written as three objects."""
    log = EventLog(store, flush_every=flush_every)
    log.record("launch", pid=123, store=store.url)
    log.record("restore", step=0, seconds=0.01)
    assert log.flush()
    for step in range(1, 6):
        log.step(step, {"loss": torch.tensor(1.0 / step), "lr": 0.1}, epoch=0)
    log.record("notice", urgent=True, step=5, source="aws", action="terminate", deadline=time.time() + 120)
    assert log.flush()
    log.record("exit", status="preempted", code=75, step=5)
    log.close()
    return log.launch, [e["kind"] for e in read_events(store) if e["launch"] == log.launch]


EXPECTED = ["launch", "restore", "step", "step", "step", "step", "step", "notice", "exit"]


def _check_roundtrip(store: Store) -> None:
    launch, kinds = _story(store)
    assert kinds == EXPECTED
    names = store.listdir(EVENTS_DIR)
    assert sorted(names) == [f"{launch}-{i:06d}.json" for i in range(3)]  # three batches, three objects
    events = read_events(store)
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5]
    assert steps[1]["metrics"] == {"loss": 0.5, "lr": 0.1}  # tensors became numbers off the loop
    assert steps[0]["first"] is True and "first" not in steps[1]
    # a second launch writes beside the first, never over it
    second, _ = _story(store)
    assert second != launch
    assert {e["launch"] for e in read_events(store)} == {launch, second}


def test_events_round_trip_on_a_local_store(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "store") as store:
        _check_roundtrip(store)


def test_events_round_trip_on_s3(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    with open_store(f"s3://{s3_bucket}/runs/events", storage_options=s3_options) as store:
        _check_roundtrip(store)


def test_events_round_trip_through_the_mirror(tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]) -> None:
    url = f"s3://{s3_bucket}/runs/mirrored"
    with MirrorStore(LocalStore(tmp_path / "disk"), open_store(url, storage_options=s3_options)) as mirror:
        _check_roundtrip(mirror)
        assert mirror.flush(timeout=60)
    # every object reached S3 as itself; a fresh instance (empty disk) and S3 alone read the same story
    with open_store(url, storage_options=s3_options) as s3:
        assert len(s3.listdir(EVENTS_DIR)) == 6
        from_s3 = read_events(s3)
    with MirrorStore(LocalStore(tmp_path / "new-disk"), open_store(url, storage_options=s3_options)) as fresh:
        assert read_events(fresh) == from_s3
    assert len(from_s3) == 2 * len(EXPECTED)


def test_events_do_not_confuse_checkpoint_readers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    model = torch.nn.Linear(3, 3)
    with Checkpointer(str(store), keep_last=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"model": model}, async_=False)
            with LocalStore(store) as s:
                _story(s)
                s.commit_file("media/samples-000000000001.png", png_bytes(torch.rand(8, 8)))
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [2, 3]  # retention kept 2, ignored events/ and media/
        latest = ckpt.latest()
        assert latest is not None and latest.step == 3
    assert cli_main(["ls", str(store)]) == 0
    assert cli_main(["verify", str(store)]) == 0
    out = capsys.readouterr().out
    assert "events" not in out and "media" not in out and "incomplete" not in out
    assert len(read_events(LocalStore(store))) == 3 * len(EXPECTED)


def test_step_metrics_are_sampled_so_a_long_run_stays_small(tmp_path: Path) -> None:
    assert [stride(s) for s in (0, 999, 1000, 1999, 2000, 3999, 4000)] == [1, 1, 2, 2, 4, 4, 8]
    with LocalStore(tmp_path / "store") as store:
        log = EventLog(store, flush_every=3600)
        for step in range(1, 100_001):
            log.step(step, {"loss": 1.0})
        log.close()
        events = read_events(store)
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps[: DENSE_STEPS - 1] == list(range(1, DENSE_STEPS))
    assert len(steps) < 4500  # 100k steps: ~1,000 dense + ~500 per doubling
    assert all(b > a for a, b in itertools.pairwise(steps))
    # whatever step the run reached is recorded when the batch is written, sampled or not
    assert events[-1]["kind"] == "progress" and events[-1]["step"] == 100_000


def test_a_kill_minus_9_loses_at_most_what_was_not_yet_written(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "store") as store:
        log = EventLog(store, flush_every=0.05)
        log.record("launch", pid=1)
        for step in range(1, 1500):
            log.step(step, {"loss": 1.0})
        wait_until(
            lambda: any(e["step"] == 1499 for e in read_events(store) if e["kind"] in ("step", "progress")),
            120,
            what="step 1499 in the store",
        )
        # no close(): a killed process never gets to it; the store already knows step 1499
        log._stop.set()
        log._wake.set()


class FlakyStore(LocalStore):
    """Refuses the first ``failures`` commits of event objects, as a throttled bucket would."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def commit_file(self, path: str, data: bytes) -> None:
        if path.startswith(f"{EVENTS_DIR}/") and self.failures > 0:
            self.failures -= 1
            raise StoreError(f"{path}: 503 Slow Down")
        super().commit_file(path, data)


def test_a_failed_write_is_retried_with_the_next_batch(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "store", failures=2)
    log = EventLog(store, flush_every=3600)
    log.record("launch")
    assert log.flush() is False
    log.record("restore", step=0)
    assert log.flush() is False
    log.step(1, {"loss": 2.0})
    assert log.flush() is True
    log.close()
    assert [e["kind"] for e in read_events(store)] == ["launch", "restore", "step"]
    assert store.listdir(EVENTS_DIR) == [f"{log.launch}-000000.json"]  # one object, once it worked


def test_unknown_versions_raise_and_damaged_objects_are_named(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "store") as store:
        _story(store)
        launch = new_launch_id()
        store.commit_file(f"{EVENTS_DIR}/{launch}-000000.json", b"{not json")
        reader = EventReader(store)
        assert [e["kind"] for e in reader.read()] == EXPECTED
        assert list(reader.problems) == [f"{launch}-000000.json"]
        doc = {"format": "spotsafe-events", "format_version": 99, "events": []}
        store.commit_file(f"{EVENTS_DIR}/{launch}-000001.json", json.dumps(doc).encode())
        with pytest.raises(FormatVersionError, match="events format version 99"):
            read_events(store)


def test_the_process_start_is_read_to_a_clock_tick() -> None:
    # /proc/stat's btime is whole seconds: a start computed from it was up to a second early, so a
    # rehearsal's report had the next launch billed before the previous one's checkpoint was durable
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "import time; from spotsafe.story.events import process_start_time as p; print(p())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = time.time()
    started = float(out)
    assert before - 0.02 <= started <= after, f"started {started - before:+.3f} s after the parent's fork"
    mine = process_start_time()
    assert mine is not None and mine <= before


def test_images_are_encoded_as_png(tmp_path: Path) -> None:
    from PIL import Image

    grid = torch.zeros(3, 4, 5)
    grid[0, 1, 2] = 1.0
    img = Image.open(io.BytesIO(png_bytes(grid)))
    assert img.size == (5, 4) and img.mode == "RGB"
    assert img.getpixel((2, 1)) == (255, 0, 0) and img.getpixel((0, 0)) == (0, 0, 0)
    gray = Image.open(io.BytesIO(png_bytes(torch.full((2, 3), 0.5))))
    assert gray.mode == "L" and gray.getpixel((1, 1)) == 128
    with pytest.raises(ValueError, match="shape"):
        png_bytes(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="PNG signature"):
        png_bytes(b"GIF89a")


def test_the_mirror_uploads_events_a_dead_instance_left_on_its_disk(
    tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    url = f"s3://{s3_bucket}/runs/resync"
    disk = tmp_path / "disk"
    with LocalStore(disk) as local:  # written locally; the instance died before the mirror uploaded them
        _story(local)
    with MirrorStore(LocalStore(disk), open_store(url, storage_options=s3_options)) as mirror:
        mirror.cleanup_incomplete()  # what the next launch's first save does
        assert mirror.flush(timeout=60)
    with open_store(url, storage_options=s3_options) as s3:
        assert [e["kind"] for e in read_events(s3)] == EXPECTED
