"""`spotsafe report`: exact facts from a rehearsed run, a kill -9, a copy of the store, Chromium, cost, the live page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.cli.main import main as cli_main
from spotsafe.storage.local import LocalStore
from spotsafe.story.events import read_events
from spotsafe.story.live import LIVE_REPORT, make_server, write_report
from tests.chromium import PLOTS_READY, chromium_binary, render
from tests.helpers import wait_until

pytest.importorskip("plotly")

TRAIN = textwrap.dedent("""
    import time, torch
    from torch import nn
    import spotsafe
    torch.manual_seed(0)
    g, d = nn.Linear(4, 8), nn.Linear(8, 2)
    og, od = torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(200, 4, generator=gen))  # 50 steps an epoch
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    run = spotsafe.Run(model={"G": g, "D": d}, optimizer={"G": og, "D": od}, every_steps=10)
    for epoch in run.epochs(4):
        for (x,) in run.batches(loader):
            loss = d(g(x)).pow(2).mean()
            og.zero_grad(); od.zero_grad(); loss.backward(); og.step(); od.step()
            time.sleep(0.02)
            run.step(loss=loss.detach(), lr=0.1)
        run.log_image("samples", torch.rand(3, 8, 8))
    run.finish()
""")


def _facts(store: str | Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli_main(["report", str(store), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


#: The tests that read ``rehearsed`` run on one xdist worker: the module fixture (a 20 s rehearsal)
#: is built once per worker that needs it.
SHARES_THE_REHEARSAL = pytest.mark.xdist_group("report-rehearsed")


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A rehearsal with two notices (three instances), and what it printed."""
    tmp = tmp_path_factory.mktemp("rehearsed")
    script = tmp / "train.py"
    script.write_text(TRAIN)
    store = tmp / "store"
    env_before = dict(os.environ)
    os.environ.update(
        {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "SPOTSAFE_AZURE_METADATA_ENDPOINT": "http://127.0.0.1:9",
        }
    )
    out_path = tmp / "stdout.txt"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "spotsafe.simulate",
                "rehearse",
                "--notice-after-steps",
                "15",
                "--preemptions",
                "2",
                "--backoff",
                "0",
                "--store",
                str(store),
                "--",
                sys.executable,
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    out_path.write_text(proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout + proc.stderr}"
    return {"store": store, "stdout": proc.stdout, "tmp": tmp}


@SHARES_THE_REHEARSAL
def test_a_rehearsal_with_two_interruptions_gives_exact_facts(
    rehearsed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store = rehearsed["store"]
    facts = _facts(store, capsys=capsys)
    assert facts["complete"] is True
    assert facts["steps"] == 200
    assert len(facts["launches"]) == 3
    assert len(facts["interruptions"]) == 2
    assert facts["steps_lost"] == 0  # honoured notices: nothing trained twice
    assert facts["seconds_redone"] == 0
    launches, interruptions = facts["launches"], facts["interruptions"]
    assert [i["kind"] for i in interruptions] == ["notice", "notice"]
    assert [(i["source"], i["action"]) for i in interruptions] == [("aws", "terminate")] * 2
    assert [launch["instance_id"] for launch in launches] == [f"i-{n:017x}" for n in (1, 2, 3)]
    assert {(launch["instance_type"], launch["zone"], launch["market"]) for launch in launches} == {
        ("g5.xlarge", "us-east-1a", "spot")
    }
    assert [launch["resumed_step"] for launch in launches] == [0, interruptions[0]["step"], interruptions[1]["step"]]
    assert [(launch["exit"] or {}).get("status") for launch in launches] == ["preempted", "preempted", "complete"]
    assert [(launch["exit"] or {}).get("code") for launch in launches] == [75, 75, 0]
    for i, interruption in enumerate(interruptions):
        # the notice came 15 steps after each launch started; that very step was saved and resumed
        assert interruption["step"] == interruption["durable_step"] == interruption["resumed_step"]
        assert interruption["step"] >= launches[i]["resumed_step"] + 15
        assert interruption["steps_redone"] == 0
        times = [
            interruption[k]
            for k in ("notice_at", "durable_at", "exit_at", "next_launch_at", "restored_at", "first_step_back_at")
        ]
        assert times == sorted(times), f"{interruption}"
        assert interruption["seconds_idle"] > 0
        assert interruption["deadline"] - interruption["durable_at"] > 60
    ck = facts["checkpoints"]
    assert ck["by_reason"]["notice"] == 2 and ck["by_reason"]["periodic"] >= 3  # step 200 was a periodic one
    assert ck["stall_s"]["count"] == ck["count"] >= 5
    assert ck["persist_s"]["count"] >= 3 and ck["bytes_last"] > 0
    # the rehearsal's summary ends with the report it wrote
    lines = [line for line in rehearsed["stdout"].splitlines() if line.strip()]
    assert lines[-2] == f"report:             {store.resolve() / LIVE_REPORT}"
    assert lines[-1] == "=" * 64
    assert (store / LIVE_REPORT).read_text().startswith("<!DOCTYPE html>")


@SHARES_THE_REHEARSAL
def test_the_report_from_a_copy_of_the_store_is_identical(rehearsed: dict[str, Any]) -> None:
    copy = rehearsed["tmp"] / "copy"
    shutil.copytree(rehearsed["store"], copy)
    try:
        facts_a, page_a = write_report(str(rehearsed["store"]))
        facts_b, page_b = write_report(str(copy))
    finally:
        shutil.rmtree(copy)
    assert json.dumps(facts_a, sort_keys=True) == json.dumps(facts_b, sort_keys=True)
    assert page_a == page_b
    assert str(rehearsed["store"]) in page_a  # the writer's store, from its events, not the path read
    assert page_a.count('<img src="data:image/png;base64,') == 4  # one sample grid per epoch, inlined


@SHARES_THE_REHEARSAL
@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_html_renders_offline_in_headless_chromium(rehearsed: dict[str, Any]) -> None:
    page = rehearsed["tmp"] / "report.html"
    write_report(str(rehearsed["store"]), str(page))
    got = render(page, ready=PLOTS_READY, screenshot=True, evaluate="document.body.innerText")
    assert got.errors == []
    url = page.resolve().as_uri()
    assert [r for r in got.requests if r != url and not r.startswith("data:")] == []  # nothing from the network
    assert url in got.requests
    text = got.evaluated
    assert "spotsafe run report" in text and "interruptions" in text and "Samples" in text
    assert got.screenshot is not None and got.screenshot.startswith(b"\x89PNG") and len(got.screenshot) > 50_000


def test_redone_steps_after_a_kill_minus_9_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import os, signal, sys, time, torch
        import spotsafe
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = spotsafe.Run(sys.argv[1], model=model, optimizer=opt, every_steps=10, async_=False, watch=False)
        killed = os.path.join(os.path.dirname(sys.argv[1]), "killed")
        while run.step_count < 60:
            loss = model(torch.ones(1, 2)).sum()
            opt.zero_grad(); loss.backward(); opt.step()
            time.sleep(0.01)  # each step takes at least 10 ms: the redone ones cost measurable time
            run.step(loss=loss.item())
            if run.step_count == 37 and not os.path.exists(killed):
                open(killed, "w").close()
                run.events.flush()  # what a flush tick would have written by now
                os.kill(os.getpid(), signal.SIGKILL)
        run.finish()
        """)
    )
    store = tmp_path / "store"
    env = dict(os.environ, SPOTSAFE_SOURCES="signal")
    first = subprocess.run([sys.executable, str(script), str(store)], env=env, timeout=300, check=False)
    assert first.returncode == -9
    with Checkpointer(str(store)) as ckpt:
        latest = ckpt.latest()
    assert latest is not None and 10 <= latest.step < 37  # where the next launch must resume
    second = subprocess.run([sys.executable, str(script), str(store)], env=env, timeout=300, check=False)
    assert second.returncode == 0
    facts = _facts(store, capsys=capsys)
    assert facts["complete"] is True and facts["steps"] == 60
    assert len(facts["launches"]) == 2
    (killed,) = facts["interruptions"]
    assert killed["kind"] == "killed" and killed["step"] == 37
    assert killed["resumed_step"] == latest.step
    redone = 37 - latest.step  # the killed launch trained up to 37; the next one redid from its checkpoint
    assert killed["steps_redone"] == redone
    assert facts["steps_lost"] == redone
    assert facts["launches"][1]["steps_redone"] == redone
    assert facts["launches"][0]["exit"] is None  # it never got to say goodbye
    # from the first step back (resumed + 1) to step 37 again, each step at least 10 ms
    assert facts["seconds_redone"] >= 0.01 * (redone - 1) - 0.001


@SHARES_THE_REHEARSAL
def test_cost_from_given_prices_and_from_describe_spot_price_history(
    rehearsed: dict[str, Any],
    ec2_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = rehearsed["store"]
    given = _facts(store, "--price", "g5.xlarge=0.5", "--on-demand-price", "1.0", capsys=capsys)["cost"]
    hours = given["billed_hours"]
    assert hours > 0 and given["training_hours"] <= hours
    assert given["spot_cost"] == pytest.approx(0.5 * hours, rel=1e-3)
    assert given["on_demand_cost_same_hours"] == pytest.approx(1.0 * hours, rel=1e-3)
    assert given["savings"] == pytest.approx(0.5, abs=1e-3)
    assert len(given["per_launch"]) == 3 and given["price_source"] == "given"
    # no endpoint answers (the tests' default): the lookup fails, said in the report, nothing else breaks
    failed = _facts(store, "--lookup-prices", capsys=capsys)
    assert failed["cost"]["spot_cost"] is None
    assert any("DescribeSpotPriceHistory for g5.xlarge in us-east-1a" in p for p in failed["problems"])
    # moto's EC2 answers DescribeSpotPriceHistory (a flat 0.00001 USD/h)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ec2_server.endpoint)
    looked = _facts(store, "--lookup-prices", "--on-demand-price", "1.006", capsys=capsys)["cost"]
    assert looked["price_source"] == "DescribeSpotPriceHistory"
    # A time-weighted mean of a flat price: equal to it up to float rounding (CI saw 1.0000000000000003e-05).
    assert [p["spot_price"] for p in looked["per_launch"]] == pytest.approx([0.00001] * 3, rel=1e-9)
    assert looked["spot_cost"] == pytest.approx(0.00001 * hours, rel=1e-2)
    assert looked["on_demand_cost_same_hours"] == pytest.approx(1.006 * hours, rel=1e-3)
    assert looked["savings"] > 0.99
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:
        cli_main(["report", str(store), "--json", "--price", "g5.xlarge"])
    assert usage.value.code == 2
    assert "--price wants INSTANCE_TYPE=USD_PER_HOUR" in capsys.readouterr().err


@SHARES_THE_REHEARSAL
def test_serve_gives_a_page_that_refreshes_itself(rehearsed: dict[str, Any]) -> None:
    with LocalStore(rehearsed["store"]) as store:
        server = make_server(store, port=0, refresh_seconds=5)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            r = requests.get(f"http://127.0.0.1:{port}/", timeout=60)
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
            assert '<meta http-equiv="refresh" content="5">' in r.text
            assert "spotsafe run report" in r.text
            assert requests.get(f"http://127.0.0.1:{port}/nope", timeout=60).status_code == 404
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


def test_the_live_page_is_refreshed_into_the_store_while_training(tmp_path: Path) -> None:
    import torch

    import spotsafe

    store = tmp_path / "store"
    model = torch.nn.Linear(2, 2)
    run = spotsafe.Run(str(store), model=model, every_steps=50, watch=False, report_every=0.3)
    try:
        assert run._live is not None
        for _ in range(5):
            run.step(loss=1.0)
        wait_until((store / LIVE_REPORT).exists, 120, what="the live page in the store")
        first = (store / LIVE_REPORT).read_text()
        assert '<meta http-equiv="refresh" content="1">' in first  # never 0: that would reload without end
        assert "not complete" in first
        for _ in range(5):
            run.step(loss=0.5)
    finally:
        run.finish()
    final = (store / LIVE_REPORT).read_text()
    assert ">complete</b>" in final  # the last page was written after the run completed
    kinds = [e["kind"] for e in read_events(LocalStore(store))]
    assert kinds[0] == "launch" and kinds[-1] == "exit"
