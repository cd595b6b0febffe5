"""The metadata simulators behave like the real endpoints (checked with plain HTTP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import requests

from spotsafe.cloud.times import parse_iso, parse_rfc1123
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.environment import simulated_environment
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from spotsafe.rehearsal.simulators.serve import main
from tests.helpers import child, wait_until

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
ITN = "/latest/meta-data/spot/instance-action"


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # never through a proxy from the environment
        yield session


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- AWS


def test_aws_token_rules(http: requests.Session) -> None:
    with AWSSimulator(require_token=True) as sim:
        url = sim.endpoint + "/latest/api/token"
        assert http.put(url, timeout=5).status_code == 400  # no TTL
        assert http.put(url, headers={TTL: "0"}, timeout=5).status_code == 400
        assert http.put(url, headers={TTL: "21601"}, timeout=5).status_code == 400
        assert http.put(url, headers={TTL: "abc"}, timeout=5).status_code == 400
        assert http.put(url, headers={TTL: "60", "X-Forwarded-For": "10.1.2.3"}, timeout=5).status_code == 403
        assert http.get(url, timeout=5).status_code == 405
        r = http.put(url, headers={TTL: "21600"}, timeout=5)
        assert r.status_code == 200 and r.headers[TTL] == "21600"
        token = r.text
        iid = sim.endpoint + "/latest/meta-data/instance-id"
        assert http.get(iid, timeout=5).status_code == 401  # v2 required
        assert http.get(iid, headers={TOKEN: "forged"}, timeout=5).status_code == 401
        r = http.get(iid, headers={TOKEN: token}, timeout=5)
        assert (r.status_code, r.text) == (200, "i-0123456789abcdef0")
        assert sim.tokens_issued == 1


def test_aws_token_expiry(http: requests.Session) -> None:
    with AWSSimulator() as sim:
        token = http.put(sim.endpoint + "/latest/api/token", headers={TTL: "1"}, timeout=5).text
        iid = sim.endpoint + "/latest/meta-data/instance-id"
        assert http.get(iid, headers={TOKEN: token}, timeout=5).status_code == 200
        assert http.get(iid, timeout=5).status_code == 200  # IMDSv1 allowed here
        time.sleep(1.1)
        assert http.get(iid, headers={TOKEN: token}, timeout=5).status_code == 401


def test_aws_metadata_paths(http: requests.Session) -> None:
    with AWSSimulator(instance_id="i-0abc", availability_zone="eu-west-1b") as sim:

        def get(path: str) -> requests.Response:
            return http.get(sim.endpoint + path, timeout=5)

        assert get("/latest/meta-data/placement/availability-zone").text == "eu-west-1b"
        assert get("/latest/meta-data/placement/region").text == "eu-west-1"
        assert "spot/" in get("/latest/meta-data/").text.split()
        doc = get("/latest/dynamic/instance-identity/document").json()
        assert (doc["instanceId"], doc["availabilityZone"], doc["region"]) == ("i-0abc", "eu-west-1b", "eu-west-1")
        assert {"accountId", "instanceType", "imageId", "privateIp", "pendingTime"} <= set(doc)
        assert get("/latest/meta-data/no-such-thing").status_code == 404


def test_aws_arm_delay_time_and_rebalance_independence(http: requests.Session) -> None:
    with AWSSimulator() as sim:

        def get(path: str) -> requests.Response:
            return http.get(sim.endpoint + path, timeout=5)

        assert get(ITN).status_code == 404
        assert get("/latest/meta-data/spot/termination-time").status_code == 404
        armed = _now()
        sim.arm("terminate", delay=1.5)
        assert get(ITN).status_code == 404  # not yet
        wait_until(lambda: get(ITN).status_code == 200, 10, what="the notice armed with a delay")
        assert _now() - armed >= timedelta(seconds=1.5)
        r = get(ITN)
        body = r.json()
        assert body["action"] == "terminate"
        expected = armed + timedelta(seconds=121.5)
        assert abs((parse_iso(body["time"]) - expected).total_seconds()) <= 1.5
        assert get("/latest/meta-data/spot/termination-time").text == body["time"]
        assert get(ITN).json() == body  # the time is fixed once armed
        # rebalance is independent of the interruption notice
        assert get("/latest/meta-data/events/recommendations/rebalance").status_code == 404
        sim.arm_rebalance()
        assert "noticeTime" in get("/latest/meta-data/events/recommendations/rebalance").json()
        sim.disarm()
        assert get(ITN).status_code == 404
        assert get("/latest/meta-data/events/recommendations/rebalance").status_code == 404
        with pytest.raises(ValueError, match="reboot"):
            sim.arm("reboot")


def test_aws_http_control_and_notice_after(http: requests.Session) -> None:
    with AWSSimulator(notice_after=1.5, action="stop") as sim:
        assert http.get(sim.endpoint + ITN, timeout=5).status_code == 404
        wait_until(lambda: http.get(sim.endpoint + ITN, timeout=5).status_code == 200, 10, what="notice_after")
        assert http.get(sim.endpoint + ITN, timeout=5).json()["action"] == "stop"
        state = http.post(sim.endpoint + "/spotsafe/disarm", timeout=5).json()
        assert state["instance_action"] is None
        state = http.post(sim.endpoint + "/spotsafe/arm?action=hibernate&delay=0", timeout=5).json()
        assert state["instance_action"]["action"] == "hibernate"
        http.post(sim.endpoint + "/spotsafe/rebalance", timeout=5)
        state = http.get(sim.endpoint + "/spotsafe/state", timeout=5).json()
        assert state["rebalance"] is not None and state["armed"] is True
        assert http.post(sim.endpoint + "/spotsafe/arm?action=explode", timeout=5).status_code == 400
        assert http.post(sim.endpoint + "/spotsafe/nope", timeout=5).status_code == 404
        # control calls are not metadata requests
        assert all(not p.startswith("/spotsafe") for _, p in sim.requests)


def test_fault_injection(http: requests.Session) -> None:
    with AWSSimulator() as sim:
        iid = sim.endpoint + "/latest/meta-data/instance-id"
        sim.inject(500, count=2)
        assert [http.get(iid, timeout=5).status_code for _ in range(3)] == [500, 500, 200]
        sim.inject(200, body="garbage", path=ITN)
        assert http.get(iid, timeout=5).text == "i-0123456789abcdef0"  # other paths unaffected
        assert http.get(sim.endpoint + ITN, timeout=5).text == "garbage"
        sim.inject(None, delay=1.0)
        with pytest.raises(requests.ReadTimeout):
            http.get(iid, timeout=(1, 0.3))
        http.post(sim.endpoint + "/spotsafe/inject?status=503&count=1", timeout=5)
        assert http.get(iid, timeout=5).status_code == 503
        with pytest.raises(ValueError):
            sim.inject(count=0)


# --------------------------------------------------------------------------- GCP


def test_gcp_flavor_header_and_etags(http: requests.Session) -> None:
    with GCPSimulator() as sim:
        url = f"http://{sim.host}/computeMetadata/v1/instance/preempted"
        assert http.get(url, timeout=5).status_code == 403
        assert (
            http.get(url, headers={"Metadata-Flavor": "Google", "X-Forwarded-For": "1.2.3.4"}, timeout=5).status_code
            == 403
        )
        r = http.get(url, headers={"Metadata-Flavor": "Google"}, timeout=5)
        assert (r.status_code, r.text, r.headers["Metadata-Flavor"]) == (200, "FALSE", "Google")
        etag = r.headers["ETag"]
        sim.preempt()
        r = http.get(url, headers={"Metadata-Flavor": "Google"}, timeout=5)
        assert r.text == "TRUE" and r.headers["ETag"] != etag
        listing = http.get(
            f"http://{sim.host}/computeMetadata/v1/instance/", headers={"Metadata-Flavor": "Google"}, timeout=5
        )
        assert {"preempted", "maintenance-event", "id", "scheduling/"} <= set(listing.text.split())


def test_gcp_wait_for_change(http: requests.Session) -> None:
    with GCPSimulator() as sim:
        url = f"http://{sim.host}/computeMetadata/v1/instance/preempted"
        h = {"Metadata-Flavor": "Google"}
        etag = http.get(url, headers=h, timeout=5).headers["ETag"]
        # a stale ETag: answers at once
        began = time.monotonic()
        r = http.get(url, params={"wait_for_change": "true", "last_etag": "0" * 16}, headers=h, timeout=5)
        assert r.text == "FALSE" and time.monotonic() - began < 1.5  # not the hang (timeout_sec defaults to an hour)
        # the current ETag and no change: waits for timeout_sec, same value
        began = time.monotonic()
        r = http.get(
            url, params={"wait_for_change": "true", "last_etag": etag, "timeout_sec": "1"}, headers=h, timeout=5
        )
        assert (r.text, r.headers["ETag"]) == ("FALSE", etag)
        assert 0.9 <= time.monotonic() - began < 3.0
        # a change during the hang: answers at once with the new value
        threading.Timer(0.3, sim.preempt).start()
        began = time.monotonic()
        r = http.get(
            url, params={"wait_for_change": "true", "last_etag": etag, "timeout_sec": "30"}, headers=h, timeout=35
        )
        assert r.text == "TRUE" and r.headers["ETag"] != etag
        assert time.monotonic() - began < 5.0  # at the change, not at timeout_sec


def test_gcp_shutdown_ends_hanging_gets(http: requests.Session) -> None:
    sim = GCPSimulator().start()
    url = f"http://{sim.host}/computeMetadata/v1/instance/preempted"
    results: list[object] = []

    def hang() -> None:
        try:
            results.append(
                http.get(
                    url,
                    params={"wait_for_change": "true", "timeout_sec": "60"},
                    headers={"Metadata-Flavor": "Google"},
                    timeout=70,
                ).text
            )
        except requests.RequestException as e:
            results.append(e)

    t = threading.Thread(target=hang)
    t.start()
    time.sleep(0.3)
    began = time.monotonic()
    sim.shutdown()
    t.join(10)
    assert time.monotonic() - began < 3.0
    assert not t.is_alive() and len(results) == 1


def test_gcp_notice_after_and_control(http: requests.Session) -> None:
    with GCPSimulator(notice_after=0.2) as sim:
        wait_until(lambda: sim.state()["preempted"] == "TRUE", 10, what="notice_after")
        http.post(sim.endpoint + "/spotsafe/reset", timeout=5)
        assert sim.state()["preempted"] == "FALSE"
        state = http.post(sim.endpoint + "/spotsafe/maintenance", timeout=5).json()
        assert state["maintenance_event"] == "TERMINATE_ON_HOST_MAINTENANCE"


# --------------------------------------------------------------------------- Azure


def test_azure_headers_and_api_version(http: requests.Session) -> None:
    with AzureSimulator() as sim:
        url = sim.endpoint + "/metadata/scheduledevents"
        r = http.get(url, params={"api-version": "2020-07-01"}, timeout=5)
        assert r.status_code == 400 and "metadata header" in r.json()["error"]
        assert http.get(url, headers={"Metadata": "true"}, timeout=5).status_code == 400
        r = http.get(url, params={"api-version": "2020-07-01"}, headers={"Metadata": "true"}, timeout=5)
        assert r.json() == {"DocumentIncarnation": 1, "Events": []}
        name = http.get(
            sim.endpoint + "/metadata/instance/compute/name",
            params={"api-version": "2021-02-01", "format": "text"},
            headers={"Metadata": "true"},
            timeout=5,
        )
        assert name.text == "spotsafe-sim-vm"


def test_azure_events_lifecycle(http: requests.Session) -> None:
    with AzureSimulator() as sim:
        url = sim.endpoint + "/metadata/scheduledevents"
        params = {"api-version": "2020-07-01"}
        h = {"Metadata": "true"}
        event_id = sim.schedule_preempt(not_before_in=30)
        doc = http.get(url, params=params, headers=h, timeout=5).json()
        assert doc["DocumentIncarnation"] == 2
        (event,) = doc["Events"]
        assert (event["EventId"], event["EventType"], event["EventStatus"]) == (event_id, "Preempt", "Scheduled")
        assert event["Resources"] == ["spotsafe-sim-vm"]
        assert 28 <= (parse_rfc1123(event["NotBefore"]) - _now()).total_seconds() <= 31
        assert event["NotBefore"].endswith(" GMT")
        assert (
            http.post(
                url, params=params, headers=h, json={"StartRequests": [{"EventId": "nope"}]}, timeout=5
            ).status_code
            == 400
        )
        assert http.post(url, params=params, headers=h, data=b"junk", timeout=5).status_code == 400
        r = http.post(url, params=params, headers=h, json={"StartRequests": [{"EventId": event_id}]}, timeout=5)
        assert r.status_code == 200
        assert sim.acknowledgements == [event_id]
        doc = http.get(url, params=params, headers=h, timeout=5).json()
        assert doc["DocumentIncarnation"] == 3
        assert (doc["Events"][0]["EventStatus"], doc["Events"][0]["NotBefore"]) == ("Started", "")


def test_azure_event_starts_when_not_before_passes() -> None:
    with AzureSimulator() as sim:
        sim.schedule_preempt(not_before_in=0.2)
        assert sim.document()["Events"][0]["EventStatus"] == "Scheduled"
        time.sleep(1.1)  # NotBefore has one-second resolution
        assert sim.document()["Events"][0]["EventStatus"] == "Started"
        sim.clear()
        assert sim.document()["Events"] == []


# --------------------------------------------------------------------------- helpers and CLI


def test_simulated_environment() -> None:
    with AWSSimulator() as aws, GCPSimulator() as gcp, AzureSimulator() as azure:
        assert simulated_environment(aws) == {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": aws.endpoint,
            "SPOTSAFE_SOURCES": "aws,signal",
        }
        env = simulated_environment(aws, gcp, azure)
        assert env["GCE_METADATA_HOST"] == gcp.host and env["SPOTSAFE_AZURE_METADATA_ENDPOINT"] == azure.endpoint
        assert env["SPOTSAFE_SOURCES"] == "aws,gcp,azure,signal"
    with pytest.raises(ValueError):
        simulated_environment()


def test_main_serves_and_prints_exports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gcp", "--duration", "0.2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("export GCE_METADATA_HOST=127.0.0.1:")
    assert "export SPOTSAFE_SOURCES=gcp,signal" in out
    assert "/spotsafe/preempt" in out
    with pytest.raises(SystemExit):
        main(["ibm"])


def test_main_delegates_rehearse(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    from spotsafe.cli.main import main as cli_main
    from spotsafe.rehearsal import rehearse
    from spotsafe.rehearsal.cli import main as simulate_main

    monkeypatch.setattr(rehearse, "main", lambda argv: seen.append(list(argv)) or 7)

    assert simulate_main(["rehearse", "--notice-after", "5", "--", "python", "train.py"]) == 7
    assert cli_main(["simulate", "rehearse", "--notice-after", "5"]) == 7
    assert seen == [["--notice-after", "5", "--", "python", "train.py"], ["--notice-after", "5"]]


def test_simulators_do_not_import_the_rehearsal_or_torch() -> None:
    code = "import sys, spotsafe.rehearsal.simulators.serve; print(sorted(m for m in ('spotsafe.rehearsal.rehearse', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_subprocess_armed_over_http(http: requests.Session) -> None:
    with child(
        [sys.executable, "-m", "spotsafe.simulate", "aws", "--require-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:")
        endpoint = line.split("=", 1)[1]
        http.post(endpoint + "/spotsafe/arm?action=terminate", timeout=5)
        token = http.put(endpoint + "/latest/api/token", headers={TTL: "60"}, timeout=5).text
        assert http.get(endpoint + ITN, timeout=5).status_code == 401
        r = http.get(endpoint + ITN, headers={TOKEN: token}, timeout=5)
        assert json.loads(r.text)["action"] == "terminate"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, f"{err}"
