"""`/metrics` of `spotsafe report --serve`: scraped and parsed with prometheus_client's own parser; the Grafana dashboard."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.storage.local import LocalStore
from spotsafe.story.cost import Prices
from spotsafe.story.live import make_server
from spotsafe.story.metrics import METRICS
from tests.story_stores import write_story

pytest.importorskip("plotly")
parser = pytest.importorskip("prometheus_client.parser")

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any], int]]:
    import torch

    root = tmp_path / "store"
    expected = write_story(root, launches=5, steps=2000, checkpoint_every=100, killed_every=2)
    with Checkpointer(str(root)) as ckpt:
        ckpt.save(1900, {"w": torch.zeros(3)}, async_=False)
    store = LocalStore(root)
    server = make_server(store, port=0, refresh_seconds=0.0, prices=Prices(spot=0.4))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        r = requests.get(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=120)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
        yield families, expected, len(r.text)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        store.close()


def _value(families: dict[str, Any], name: str, sample: str | None = None) -> float:
    family = families[name]
    return float(next(s.value for s in family.samples if s.name == (sample or name)))


def test_metrics_are_scraped_and_parsed_with_the_facts_values(
    scraped: tuple[dict[str, Any], dict[str, Any], int],
) -> None:
    families, expected, _ = scraped
    assert _value(families, "spotsafe_launches", "spotsafe_launches_total") == 5
    assert _value(families, "spotsafe_interruptions", "spotsafe_interruptions_total") == 4
    assert _value(families, "spotsafe_steps_redone", "spotsafe_steps_redone_total") == expected["steps_redone"] > 0
    assert _value(families, "spotsafe_seconds_lost", "spotsafe_seconds_lost_total") > 0
    assert _value(families, "spotsafe_steps") == 2000
    assert _value(families, "spotsafe_complete") == 0  # no COMPLETE.json: the story says complete, the store does not
    assert _value(families, "spotsafe_newest_checkpoint_step") == 1900
    assert 0 <= _value(families, "spotsafe_newest_checkpoint_age_seconds") < 3600
    hours = _value(families, "spotsafe_billed_hours")
    assert hours > 0 and _value(families, "spotsafe_cost_usd") == pytest.approx(0.4 * hours, rel=0.01)
    stall = families["spotsafe_checkpoint_stall_seconds"]
    assert stall.type == "histogram"
    count = next(s for s in stall.samples if s.name == "spotsafe_checkpoint_stall_seconds_count")
    assert count.labels == {"rank": "0"} and count.value > 20
    inf = next(s for s in stall.samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    assert inf.value == count.value
    assert families["spotsafe_checkpoint_persist_seconds"].type == "histogram"
    assert set(families) <= set(METRICS)


def test_the_grafana_dashboard_names_only_metrics_that_are_served(
    scraped: tuple[dict[str, Any], dict[str, Any], int],
) -> None:
    families, _, _ = scraped
    served: set[str] = {s.name for f in families.values() for s in f.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    named = {m for e in exprs for m in re.findall(r"\bspotsafe_[a-z_]+\b", e)}
    assert named, f"{exprs}"
    assert named <= served, f"{sorted(named - served)}"
    # and every family the server has is on the dashboard somewhere
    assert {f for f in families if not any(n.startswith(f) for n in named)} == set()
