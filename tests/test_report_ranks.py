"""Multi-rank runs: every rank's notice, stall and persist in the report, not rank 0's view only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from spotsafe.storage.local import LocalStore
from spotsafe.story.events import EVENTS_DIR, EventLog, read_events
from spotsafe.story.facts import StoreReport
from spotsafe.story.live import build_page
from spotsafe.story.metrics import metrics_text

pytest.importorskip("plotly")


def _two_ranks(root: Path) -> None:
    store = LocalStore(root)
    lead = EventLog(store, flush_every=3600)
    other = EventLog(store, flush_every=3600, enabled=False, rank=1)
    lead.watch_saves(lambda: (10, {"write_s": 0.5, "commit_s": 0.1}, 1000))
    timings = {"write_s": 2.0}
    other.watch_saves(lambda: (None, timings, None))  # a rank that does not commit: its own files written
    lead.record("launch", pid=1, world_size=2)
    other.record("launch", pid=2)  # not a rank's to record: dropped
    for log in (lead, other):
        log.step(1, {"loss": 1.0})
    lead.checkpoint(10, epoch=0, reason="periodic", stall_s=0.01)
    other.checkpoint(10, epoch=0, reason="periodic", stall_s=0.2)
    now = time.time()
    lead.record("notice", step=12, source="aws", action="terminate", detected_at=now, deadline=now + 120)
    other.record("notice", step=12, source="aws", action="terminate", detected_at=now + 0.5, deadline=now + 120)
    for log in (lead, other):
        log.before_save()
        log.close()
    store.close()


def test_every_rank_records_its_notice_stall_and_persist_and_the_report_shows_them(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _two_ranks(root)
    names = sorted(p.name for p in (root / EVENTS_DIR).iterdir())
    assert len(names) == 2 and sum("-r0001-" in n for n in names) == 1
    rank_events = [e for e in read_events(LocalStore(root)) if e.get("rank")]
    assert sorted(e["kind"] for e in rank_events) == ["checkpoint", "notice"]  # no launch, no step from rank 1
    report = StoreReport(LocalStore(root))
    facts, events, page = build_page(report)
    assert len(facts["launches"]) == 1 and facts["launches"][0]["checkpoints"] == 1  # rank 1's save is not a second
    assert facts["checkpoints"]["count"] == 1
    ranks = {r["rank"]: r for r in facts["ranks"]}
    assert sorted(ranks) == [0, 1]
    assert ranks[0]["stall_s"]["median"] == 0.01 and ranks[1]["stall_s"]["median"] == 0.2
    assert ranks[0]["persist_s"]["median"] == 0.6 and ranks[1]["persist_s"]["median"] == 2.0
    assert ranks[1]["notices"][0]["detected_at"] - ranks[0]["notices"][0]["detected_at"] == pytest.approx(0.5, abs=0.01)
    assert page.count("<h2>Ranks</h2>") == 1
    assert page.count("ranks differ in: notice, persist, stall") == 1
    assert page.count("launch 1: step 12 (+500 ms)") == 1
    text = metrics_text(LocalStore(root), facts, events).decode()
    assert 'spotsafe_checkpoint_stall_seconds_count{rank="1"} 1.0' in text
    assert 'spotsafe_checkpoint_persist_seconds_sum{rank="1"} 2.0' in text


def test_a_single_rank_run_has_no_ranks_section(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    log = EventLog(store, flush_every=3600)
    log.record("launch", pid=1)
    log.step(1, {"loss": 1.0})
    log.close()
    facts, _, page = build_page(StoreReport(store))
    assert facts["ranks"] == [] and page.count("<h2>Ranks</h2>") == 0


def test_a_rank_object_cannot_carry_the_run_s_story(tmp_path: Path) -> None:
    """An object named as rank 3's holds only rank kinds; an event cannot claim a rank the name does not give."""
    root = tmp_path / "store"
    _two_ranks(root)
    launch = sorted((root / EVENTS_DIR).iterdir())[0].name[:28]
    t = time.time()
    doc: dict[str, Any] = {
        "format": "spotsafe-events",
        "format_version": 1,
        "events": [
            {"kind": "step", "time": t, "step": 10**6, "metrics": {}},
            {"kind": "checkpoint", "time": t, "step": 5, "stall_s": 9.0, "rank": 0},
        ],
    }
    (root / EVENTS_DIR / f"{launch}-r0003-000000.json").write_text(json.dumps(doc))
    forged = {**doc, "events": [{"kind": "checkpoint", "time": t, "step": 5, "stall_s": 7.0, "rank": 5}]}
    (root / EVENTS_DIR / f"{launch}-000009.json").write_text(json.dumps(forged))
    facts, _ = StoreReport(LocalStore(root)).build()
    assert facts["steps"] == 12  # the step of 10**6 in rank 3's object was not taken
    assert any("-r0003-000000.json: event 0 (step): not a kind rank 3 records" in p for p in facts["problems"])
    assert sorted(r["rank"] for r in facts["ranks"]) == [0, 1, 3]
    assert facts["checkpoints"]["count"] == 2  # the forged rank-5 event counts as rank 0's (its object's)
