"""`spotsafe report` on stores it did not write: damaged events, hostile names and images, long runs, --serve.

The five cases of issue 25 (each fails on the code before it), a seeded fuzz of event objects,
images and names that must never abort the report, the live page or the server, and the
closed-pipe exit of ``--json``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from spotsafe.cli.main import main as cli_main
from spotsafe.storage.local import LocalStore
from spotsafe.story.events import EVENTS_DIR
from spotsafe.story.facts import StoreReport
from spotsafe.story.html import MAX_IMAGES
from spotsafe.story.live import LIVE_REPORT, LivePage, build_page, make_server
from spotsafe.story.validate import MAX_EVENTS_OBJECT_BYTES, MAX_MEDIA_BYTES
from tests.chromium import PLOTS_READY, chromium_binary, render
from tests.story_stores import launch_id, png, write_story

pytest.importorskip("plotly")

LAUNCH = launch_id(1_790_000_000.0, 0xABC)


def _object(root: Path, events: list[Any], seq: int = 0, launch: str = LAUNCH) -> str:
    name = f"{launch}-{seq:06d}.json"
    doc = {"format": "spotsafe-events", "format_version": 1, "launch": launch, "seq": seq, "events": events}
    (root / EVENTS_DIR).mkdir(parents=True, exist_ok=True)
    (root / EVENTS_DIR / name).write_text(json.dumps(doc))
    return name


def _facts(root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli_main(["report", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _good(t: float = 1_790_000_100.0) -> list[dict[str, Any]]:
    return [
        {"kind": "launch", "time": t, "pid": 7},
        {"kind": "step", "time": t + 1, "step": 1, "metrics": {"loss": 1.0}, "first": True},
        {"kind": "step", "time": t + 2, "step": 2, "metrics": {"loss": 0.5}},
    ]


BAD_EVENTS: dict[str, dict[str, Any]] = {
    "time as a string": {"kind": "step", "time": "yesterday", "step": 3, "metrics": {}},
    "a checkpoint without step": {"kind": "checkpoint", "time": 1_790_000_103.0, "reason": "periodic", "stall_s": 0.1},
    "metrics as a list": {"kind": "step", "time": 1_790_000_103.0, "step": 3, "metrics": [1, 2]},
    "time of 1e300": {"kind": "step", "time": 1e300, "step": 3, "metrics": {}},
    "an image path with ..": {"kind": "image", "time": 1_790_000_103.0, "path": "media/../../etc/passwd", "step": 3},
}


@pytest.mark.parametrize("what", sorted(BAD_EVENTS))
def test_one_malformed_event_is_skipped_and_named_never_fatal(
    what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    name = _object(root, [*_good(), BAD_EVENTS[what]])
    facts = _facts(root, capsys)
    assert facts["steps"] == 2 and len(facts["launches"]) == 1  # the good events of the same object are kept
    assert [p for p in facts["problems"] if p.startswith(f"events/{name}: event 3 ")], f"{facts['problems']}"
    out = tmp_path / "r.html"
    assert cli_main(["report", str(root), "-o", str(out)]) == 0
    assert out.read_text().count(name) >= 1  # listed on the page under problems
    page = LivePage(LocalStore(root), every=3600)
    assert page.refresh(), f"{page.last_error}"  # the live page keeps going too


def test_deeply_nested_json_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    _object(root, _good())
    deep = f"{LAUNCH}-000001.json"
    (root / EVENTS_DIR / deep).write_text(
        '{"format":"spotsafe-events","format_version":1,"events":[' + "[" * 200_000 + "]" * 200_000 + "]}"
    )
    facts = _facts(root, capsys)
    assert facts["steps"] == 2
    assert any(p.startswith(f"events/{deep}: ") and "not valid JSON" in p for p in facts["problems"]), (
        f"{facts['problems']}"
    )


def test_an_image_that_is_a_link_out_of_the_store_is_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(1) + b"SECRET-BYTES")
    (root / "media").mkdir(parents=True)
    os.symlink(secret, root / "media" / "samples-000000000002.png")
    image = {"kind": "image", "time": 1_790_000_102.5, "path": "media/samples-000000000002.png", "step": 2}
    _object(root, [*_good(), image])
    report = StoreReport(LocalStore(root))
    facts, _, page = build_page(report)
    assert page.count('<img src="data:image/png') == 0
    assert any("media/samples-000000000002.png" in p for p in facts["problems"]), f"{facts['problems']}"
    out = tmp_path / "r.html"
    assert cli_main(["report", str(root), "-o", str(out)]) == 0


def test_oversized_event_objects_and_images_are_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    _object(root, _good())
    # A valid object past the cap: its events would count if it were read.
    pad = "x" * 4000
    big = [{"kind": "step", "time": 1_790_000_200.0 + i, "step": 100 + i, "note": pad} for i in range(4400)]
    huge = _object(root, big, seq=1)
    assert (root / EVENTS_DIR / huge).stat().st_size > MAX_EVENTS_OBJECT_BYTES
    (root / "media").mkdir()
    (root / "media" / "big-000000000002.png").write_bytes(png(2) + b"\0" * (MAX_MEDIA_BYTES + 1))
    _object(root, [{"kind": "image", "time": 1_790_000_102.5, "path": "media/big-000000000002.png", "step": 2}], seq=2)
    facts = _facts(root, capsys)
    assert facts["steps"] == 2
    assert any(
        p.startswith(f"events/{huge}: ") and "more than an events object may hold" in p for p in facts["problems"]
    )
    _, _, page = build_page(StoreReport(LocalStore(root)))
    assert page.count("media/big-000000000002.png") >= 1 and page.count("more than an image may hold") == 1
    assert page.count('<img src="data:image/png') == 0


def test_log_image_refuses_a_png_past_the_cap(tmp_path: Path) -> None:
    from spotsafe.story.recorder import Recorder

    recorder = Recorder(events_file="")
    with pytest.raises(ValueError, match="image tag must be ASCII"):
        recorder.image("../x", png(1), step=1, epoch=0)
    from spotsafe.story.events import EventLog

    recorder.events = EventLog(LocalStore(tmp_path / "s"), flush_every=60)
    try:
        with pytest.raises(ValueError, match="more than the report reads"):
            recorder.image("big", png(1) + b"\0" * MAX_MEDIA_BYTES, step=1, epoch=0)
    finally:
        recorder.events.close()


def test_rendering_adds_no_shape_or_trace_per_launch(tmp_path: Path) -> None:
    """Case 2: shapes were added one call per launch per metric row (quadratic: 100 launches ~ 15 min)."""
    import plotly.basedatatypes

    write_story(tmp_path / "s", launches=60, steps=6000, checkpoint_every=500)
    report = StoreReport(LocalStore(tmp_path / "s"))
    calls: list[str] = []
    real = plotly.basedatatypes.BaseFigure._add_annotation_like

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else "?")
        return real(self, *args, **kwargs)

    with mock.patch.object(plotly.basedatatypes.BaseFigure, "_add_annotation_like", counted):
        facts, _, page = build_page(report)
    assert calls == []  # no add_vline / add_vrect / add_shape: the shapes are set in one go
    assert len(facts["launches"]) == 60 and len(facts["interruptions"]) == 59
    assert page.count('"type":"line"') >= 59 * 4  # a dotted line per resume in each of the 4 metric rows


def test_the_live_page_holds_only_the_images_it_shows(tmp_path: Path) -> None:
    """Case 3: after 10 refreshes with 200 images logged, the old cache held 120 of them."""
    root = tmp_path / "store"
    (root / "media").mkdir(parents=True)
    page = LivePage(LocalStore(root), every=3600)
    step = 0
    for refresh in range(10):
        events = []
        for _ in range(20):
            step += 1
            path = f"media/samples-{step:012d}.png"
            (root / path).write_bytes(png(step))
            events.append({"kind": "image", "time": 1_790_000_000.0 + step, "path": path, "step": step})
        _object(root, events, seq=refresh)
        assert page.refresh(), f"{page.last_error}"
        assert page.report.images_held <= MAX_IMAGES
    assert step == 200
    written = (root / LIVE_REPORT).read_text()
    assert written.count('<img src="data:image/png') == MAX_IMAGES
    assert written.count('<script type="text/javascript" src="plotly-') == 1
    assert (root / LIVE_REPORT).stat().st_size < 1_000_000  # plotly.js sits beside it once, not in every page
    assert list(root.glob("plotly-*.min.js"))


@contextmanager
def _served(root: Path) -> Iterator[int]:
    store = LocalStore(root)
    server = make_server(store, port=0, refresh_seconds=0.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        store.close()


def _raw_get(port: int, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("dirname", ["run\r\nSet-Cookie: stolen=1\r\nX-Evil: 1", "训练-运行"])
def test_serve_puts_no_store_text_in_the_status_line(tmp_path: Path, dirname: str) -> None:
    """Case 4: a page-build error went into the status line (CR/LF injected headers; non-latin-1 crashed)."""
    root = tmp_path / dirname
    (root / EVENTS_DIR).mkdir(parents=True)
    # A newer format version stops the page (not a damaged object to skip): its message names the store path.
    newer = {"format": "spotsafe-events", "format_version": 99, "events": []}
    (root / EVENTS_DIR / f"{LAUNCH}-000000.json").write_text(json.dumps(newer))
    with _served(root) as port:
        response = _raw_get(port)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.0 500 Internal Server Error"
    assert not any(line.lower().startswith((b"set-cookie", b"x-evil")) for line in lines)
    text = body.decode("utf-8")
    assert "newer than supported" in text and "<p>" in text


def test_serve_binds_to_localhost_unless_told(tmp_path: Path) -> None:
    from spotsafe.story.cli import _parser

    assert _parser().parse_args(["s"]).host == "127.0.0.1"
    server = make_server(LocalStore(tmp_path), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_story(root, launches=3, steps=300, checkpoint_every=50)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotsafe.cli.main", "report", str(root), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head -0`: the reader is gone before the first byte
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0, f"{err}"
    assert err == ""


# -- the fuzz ---------------------------------------------------------------------------------

JUNK: list[Any] = [
    None,
    "",
    "x" * 5000,
    "\r\nSet-Cookie: a=1",
    "训练",
    -1,
    0,
    2**64,
    1e300,
    -1e300,
    float("nan"),
    True,
    [],
    [1, "a"],
    {},
    {"a": {"b": [1]}},
    "media/../x.png",
    "/etc/passwd",
]


def _mutate(rng: random.Random, event: dict[str, Any]) -> dict[str, Any]:
    e = dict(event)
    for _ in range(rng.randint(1, 3)):
        choice = rng.random()
        if choice < 0.6 and e:
            e[rng.choice(sorted(e))] = rng.choice(JUNK)
        elif choice < 0.8:
            e[rng.choice(["step", "time", "metrics", "path", "kind", "rank", "stall_s", "extra"])] = rng.choice(JUNK)
        elif e:
            e.pop(rng.choice(sorted(e)))
    return e


def _fuzz_store(rng: random.Random, root: Path) -> None:
    write_story(root, launches=4, steps=400, images=6, checkpoint_every=50)
    objects = sorted((root / EVENTS_DIR).iterdir())
    for path in rng.sample(objects, k=2):
        doc = json.loads(path.read_text())
        events = doc["events"]
        for i in rng.sample(range(len(events)), k=min(5, len(events))):
            events[i] = _mutate(rng, events[i])
        if rng.random() < 0.3:
            doc[rng.choice(["format_version", "events", "launch"])] = rng.choice(JUNK)
        path.write_text(json.dumps(doc))
    victim = rng.choice(objects)
    action = rng.randrange(4)
    if action == 0:
        victim.write_bytes(victim.read_bytes()[: rng.randrange(1, 200)])  # truncated
    elif action == 1:
        victim.write_bytes(bytes(rng.randrange(256) for _ in range(300)))  # noise
    elif action == 2:
        os.mkfifo(root / EVENTS_DIR / f"{launch_id(1_790_000_500.0, 5)}-000000.json")  # a FIFO with a good name
    else:
        (root / EVENTS_DIR / f"{launch_id(1_790_000_500.0, 6)}-000000.json").mkdir()  # a directory
    images = sorted((root / "media").iterdir())
    rng.choice(images).write_bytes(png(3)[: rng.randrange(1, 40)])
    os.symlink("/etc/hostname", rng.choice(images).with_name("samples-999999999999.png"))
    (root / EVENTS_DIR / "odd name\r\n.json").write_text("{}")


@pytest.mark.parametrize("seed", range(12))
def test_fuzzed_stores_never_abort_the_report_the_live_page_or_the_server(
    seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(seed)
    root = tmp_path / "store"
    _fuzz_store(rng, root)
    facts = _facts(root, capsys)
    assert isinstance(facts["launches"], list) and isinstance(facts["problems"], list)
    assert facts["problems"]  # the damage is named, not silently used
    assert cli_main(["report", str(root), "-o", str(tmp_path / "r.html")]) == 0
    page = LivePage(LocalStore(root), every=3600)
    assert page.refresh(), f"{page.last_error}"
    with _served(root) as port:
        for path in ("/", "/metrics"):
            head = _raw_get(port, path).split(b"\r\n", 1)[0]
            assert head == b"HTTP/1.0 200 OK", f"{(path, head)}"


def test_a_store_holding_every_step_tells_the_same_facts_as_one_spotsafe_wrote(tmp_path: Path) -> None:
    """Objects denser than the writer keeps are thinned on read as the writer would: same facts, a fraction of the cost."""
    sampled, dense = tmp_path / "sampled", tmp_path / "dense"
    write_story(sampled, launches=3, steps=30_000, checkpoint_every=1000)
    write_story(dense, launches=3, steps=30_000, checkpoint_every=1000, dense=True)
    a, events_a = StoreReport(LocalStore(sampled)).build()
    b, events_b = StoreReport(LocalStore(dense)).build()
    for key in ("steps", "steps_lost", "complete", "problems"):
        assert a[key] == b[key], f"{key}"
    for la, lb in zip(a["launches"], b["launches"], strict=True):
        for key in ("resumed_step", "last_step", "steps_redone", "checkpoints", "first_step_at"):
            assert la[key] == lb[key], f"{key}"
    assert [i["step"] for i in a["interruptions"]] == [i["step"] for i in b["interruptions"]]
    assert len(events_b) < 2 * len(events_a)  # not the 30,000 step events the store holds


def test_a_replacement_launched_before_the_old_instance_exited_is_shown_as_an_overlap(tmp_path: Path) -> None:
    """Capacity rebalancing starts the replacement before the old instance is gone: a negative gap, said as one."""
    root = tmp_path / "store"
    write_story(root, launches=2, steps=200, checkpoint_every=50)
    first, second = sorted((root / EVENTS_DIR).iterdir())
    exit_at = next(e["time"] for e in json.loads(first.read_text())["events"] if e["kind"] == "exit")
    doc = json.loads(second.read_text())
    doc["events"][0]["process_started"] = exit_at - 45.0
    second.write_text(json.dumps(doc))
    facts, _, page = build_page(StoreReport(LocalStore(root)))
    (gap,) = facts["interruptions"]
    assert gap["next_launch_at"] == pytest.approx(exit_at - 45.0)
    assert "<td>-45.0 s</td>" in page, "exit → next launch: 45 s of overlap"
    assert "-45000 ms" not in page


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_live_page_draws_offline_with_plotly_beside_it(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_story(root, launches=5, steps=2000, images=6, checkpoint_every=100)
    page = LivePage(LocalStore(root), every=3600)
    assert page.refresh(), f"{page.last_error}"
    got = render(root / LIVE_REPORT, ready=PLOTS_READY)
    assert got.errors == []
    js = next(root.glob("plotly-*.min.js")).resolve().as_uri()
    fetched = sorted(r for r in got.requests if not r.startswith("data:"))
    assert fetched == sorted([(root / LIVE_REPORT).resolve().as_uri(), js])  # the page and plotly beside it, no network
