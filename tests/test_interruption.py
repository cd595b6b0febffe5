"""InterruptionWatcher and its sources, each against its real loopback simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from spotsafe.cloud.aws.metadata import AWSMetadata
from spotsafe.cloud.aws.notices import AWSSource
from spotsafe.cloud.azure.notices import AzureSource
from spotsafe.cloud.gcp.notices import GCPSource
from spotsafe.cloud.notice import Notice
from spotsafe.cloud.times import parse_iso, parse_rfc1123
from spotsafe.cloud.watcher import InterruptionWatcher
from spotsafe.errors import MetadataError
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from tests.helpers import child, wait_until

POLL = 0.2
#: What a loaded 2-core machine may add to a detection (thread wake-ups, the simulator's own thread
#: beside the watcher's in one process). The detection latencies are measured, not asserted, in
#: benchmarks (bench_watcher.py); the GCP test's bound stays under its 2 s poll interval.
LOADED = 1.5
INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- Notice


def test_notice_validates_and_round_trips() -> None:
    now = _now()
    notice = Notice("aws", "stop", now + timedelta(seconds=120), now, {"action": "stop"})
    assert notice.is_final is True
    assert Notice("aws", "rebalance", now, now).is_final is False
    assert Notice.from_dict(notice.to_dict()) == notice
    assert 119 <= notice.time_left(now) <= 120
    with pytest.raises(ValueError, match="action"):
        Notice("aws", "explode", now, now)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone-aware"):
        Notice("aws", "terminate", datetime.now(), now)


def test_notice_from_dict_refuses_unknown_version_and_fields() -> None:
    now = _now()
    data = Notice("gcp", "terminate", now, now).to_dict()
    with pytest.raises(ValueError, match="version"):
        Notice.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="unknown Notice fields"):
        Notice.from_dict({**data, "colour": "red"})


def test_time_parsers() -> None:
    assert parse_iso("2026-11-22T08:22:00Z") == datetime(2026, 11, 22, 8, 22, tzinfo=timezone.utc)
    assert parse_rfc1123("Mon, 19 Sep 2016 18:29:47 GMT") == datetime(2016, 9, 19, 18, 29, 47, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_rfc1123("next tuesday")


# --------------------------------------------------------------------------- AWS client


def test_aws_metadata_reads_identity_and_instance_action(aws_v2: AWSSimulator) -> None:
    md = AWSMetadata(aws_v2.endpoint)
    try:
        assert md.instance_id == "i-0123456789abcdef0"
        assert md.availability_zone == "us-east-1a"
        assert md.region == "us-east-1"
        assert md.identity["accountId"] == "123456789012"
        assert md.instance_action is None
        assert md.rebalance_recommendation is None
        aws_v2.arm("hibernate")
        action = md.instance_action
        assert action is not None and action["action"] == "hibernate"
        assert md.termination_time is None  # the legacy path is only for terminate
        assert md.uses_imdsv1 is False
        assert aws_v2.tokens_issued == 1  # cached across all those reads
    finally:
        md.close()


def test_aws_metadata_endpoint_from_env(aws: AWSSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.endpoint + "/")
    md = AWSMetadata()
    try:
        assert md.endpoint == aws.endpoint
        assert md.instance_id == "i-0123456789abcdef0"
    finally:
        md.close()


def test_aws_token_refreshed_before_expiry(aws_v2: AWSSimulator) -> None:
    md = AWSMetadata(aws_v2.endpoint, token_ttl=1)
    try:
        assert md.instance_action is None
        assert aws_v2.tokens_issued == 1
        time.sleep(1.0)  # past the refresh point (80% of the TTL)
        assert md.instance_action is None
        assert aws_v2.tokens_issued == 2
    finally:
        md.close()


def test_aws_token_refetched_once_on_401(aws_v2: AWSSimulator) -> None:
    md = AWSMetadata(aws_v2.endpoint)
    try:
        assert md.instance_action is None
        aws_v2.expire_tokens()  # the cached token is now rejected with 401
        aws_v2.arm("terminate")
        assert md.instance_action is not None
        assert aws_v2.tokens_issued == 2
    finally:
        md.close()


@pytest.mark.parametrize("status", [403, 404, 405])
def test_aws_falls_back_to_imdsv1_when_token_refused(aws: AWSSimulator, status: int) -> None:
    aws.inject(status, count=100, path="/latest/api/token")
    md = AWSMetadata(aws.endpoint)
    try:
        aws.arm("stop")
        action = md.instance_action
        assert action is not None and action["action"] == "stop"
        assert md.uses_imdsv1 is True
        assert aws.tokens_issued == 0
    finally:
        md.close()


def test_aws_falls_back_to_imdsv1_when_token_put_gets_no_answer(aws: AWSSimulator) -> None:
    # The container case: the PUT's answer is dropped by the hop limit.
    aws.inject(None, count=100, delay=1.0, path="/latest/api/token")
    md = AWSMetadata(aws.endpoint, timeout=0.3)
    try:
        assert md.instance_id == "i-0123456789abcdef0"
        assert md.uses_imdsv1 is True
    finally:
        md.close()


def test_aws_v1_client_goes_back_to_v2_when_required(aws: AWSSimulator) -> None:
    aws.inject(404, count=1, path="/latest/api/token")
    md = AWSMetadata(aws.endpoint)
    try:
        assert md.instance_action is None
        assert md.uses_imdsv1 is True
        aws.require_token = True  # the instance switches to HttpTokens=required
        assert md.instance_action is None
        assert md.uses_imdsv1 is False
        assert aws.tokens_issued == 1
    finally:
        md.close()


def test_aws_metadata_errors_name_the_url() -> None:
    md = AWSMetadata("http://127.0.0.1:9", timeout=0.5)
    try:
        with pytest.raises(MetadataError, match=r"127\.0\.0\.1:9/latest/api/token"):
            _ = md.instance_action
        assert md.probe(0.5) is False
    finally:
        md.close()


def test_aws_metadata_5xx_raises(aws: AWSSimulator) -> None:
    md = AWSMetadata(aws.endpoint)
    try:
        _ = md.instance_action
        aws.inject(503, path=INSTANCE_ACTION)
        with pytest.raises(MetadataError, match="HTTP 503"):
            _ = md.instance_action
    finally:
        md.close()


# --------------------------------------------------------------------------- AWS through the watcher


def _watch(*sources: object, **kwargs: object) -> InterruptionWatcher:
    kwargs.setdefault("poll_interval", POLL)
    kwargs.setdefault("signals", ())
    return InterruptionWatcher(list(sources), **kwargs)  # type: ignore[arg-type]


def test_aws_notice_detected_within_one_poll_interval(aws_v2: AWSSimulator) -> None:
    with _watch(AWSSource(aws_v2.endpoint)) as watcher:
        assert watcher.sources == ("aws",)
        time.sleep(POLL)
        assert watcher.notice is None
        armed = time.monotonic()
        aws_v2.arm("terminate")
        notice = watcher.wait(5)
        latency = time.monotonic() - armed
    assert notice is not None
    assert latency < POLL + LOADED, f"{latency:.2f} s"  # the next poll found it
    assert (notice.source, notice.action) == ("aws", "terminate")
    assert notice.deadline == parse_iso(aws_v2.state()["instance_action"]["time"])
    assert 115 < (notice.deadline - notice.detected_at).total_seconds() <= 121
    assert notice.payload["action"] == "terminate"


def test_aws_watcher_from_env_with_auto(aws: AWSSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.endpoint)
    with InterruptionWatcher(poll_interval=POLL, signals=()) as watcher:
        assert watcher.sources == ("aws",)  # GCP and Azure point at the closed port
        aws.arm("stop")
        notice = watcher.wait(5)
    assert notice is not None and notice.action == "stop"


def test_aws_disabled_by_env(aws: AWSSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with InterruptionWatcher(poll_interval=POLL, signals=()) as watcher:
        assert watcher.sources == ()
    assert aws.requests == []


def test_sources_env_overrides_auto(aws: AWSSimulator, gcp: GCPSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.endpoint)
    monkeypatch.setenv("GCE_METADATA_HOST", gcp.host)
    monkeypatch.setenv("SPOTSAFE_SOURCES", "gcp")
    with InterruptionWatcher(poll_interval=POLL) as watcher:
        assert watcher.sources == ("gcp", "signal")  # signals stay on
    assert aws.requests == []


def test_unknown_source_name_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown interruption source 'ibm'"):
        InterruptionWatcher("aws,ibm").start()
    monkeypatch.setenv("SPOTSAFE_SOURCES", "signal,oracle")
    with pytest.raises(ValueError, match="'oracle' in SPOTSAFE_SOURCES"):
        InterruptionWatcher().start()


def test_rebalance_then_terminate(aws: AWSSimulator) -> None:
    seen: list[Notice] = []
    got_two = threading.Event()

    def callback(notice: Notice) -> None:
        seen.append(notice)
        if len(seen) == 2:
            got_two.set()

    with _watch(AWSSource(aws.endpoint), callback=callback) as watcher:
        before = aws.count("GET", "/latest/meta-data/events/recommendations/rebalance")  # polls that found none
        aws.arm_rebalance()
        first = watcher.wait(5)
        assert first is not None and first.action == "rebalance" and not first.is_final
        assert first.payload["noticeTime"] == aws.state()["rebalance"]["noticeTime"]
        assert watcher.wait(POLL * 3, final=True) is None  # a rebalance is not final
        aws.arm("terminate")
        final = watcher.wait(5, final=True)
        assert final is not None and final.action == "terminate"
        assert watcher.notice == final
        assert got_two.wait(5)
    assert [n.action for n in seen] == ["rebalance", "terminate"]
    # the rebalance was read once, not on every poll after it appeared (one poll may have been on
    # the wire as it was armed; however many came before depends on how fast the test got there)
    after = aws.count("GET", "/latest/meta-data/events/recommendations/rebalance")
    assert 1 <= after - before <= 2, f"{after - before} GETs of the rebalance since it was armed"


def test_rebalance_off(aws: AWSSimulator) -> None:
    with _watch(AWSSource(aws.endpoint, rebalance=False)) as watcher:
        aws.arm_rebalance()
        assert watcher.wait(POLL * 4) is None
    assert aws.count("GET", "/latest/meta-data/events/recommendations/rebalance") == 0


def test_first_final_notice_wins(aws: AWSSimulator) -> None:
    with _watch(AWSSource(aws.endpoint)) as watcher:
        aws.arm("stop")
        first = watcher.wait(5)
        assert first is not None
        watcher.trigger("terminate", deadline_in=1)
        aws.arm_rebalance()
        time.sleep(POLL * 2)
        assert watcher.notice is first


def test_legacy_termination_time_fallback(aws: AWSSimulator) -> None:
    aws.inject(404, count=10_000, path=INSTANCE_ACTION)  # an old IMDS without instance-action
    with _watch(AWSSource(aws.endpoint)) as watcher:
        aws.arm("terminate")
        notice = watcher.wait(5)
    assert notice is not None and notice.action == "terminate"
    assert notice.deadline == parse_iso(aws.state()["instance_action"]["time"])
    assert "termination-time" in notice.payload


def test_no_false_notice_through_errors_timeouts_and_restarts(aws: AWSSimulator) -> None:
    aws.inject(500, count=2)
    aws.inject(None, count=1, delay=0.6)  # answers after the client gave up
    aws.inject(502, count=1, body="<html>bad gateway</html>")
    with _watch(AWSSource(aws.endpoint, timeout=0.3), poll_interval=0.1) as watcher:
        wait_until(lambda: aws.faults_pending == 0, 10, what="every fault served to the watcher")
        time.sleep(0.3)
        assert watcher.notice is None
        assert all(t.is_alive() for t in watcher._threads)
        aws.arm("terminate")  # and it still works after all that
        notice = watcher.wait(5)
    assert notice is not None and notice.action == "terminate"


def test_no_false_notice_when_the_endpoint_goes_away_and_comes_back() -> None:
    sim = AWSSimulator().start()
    port = int(sim.endpoint.rsplit(":", 1)[1])
    with _watch(AWSSource(sim.endpoint, timeout=0.3), poll_interval=0.1) as watcher:
        time.sleep(0.2)
        sim.shutdown()  # connection refused from now on
        time.sleep(0.5)
        assert watcher.notice is None
        with AWSSimulator(port=port) as again:
            again.arm("terminate")
            notice = watcher.wait(15)  # backoff is bounded
        assert notice is not None and notice.action == "terminate"


def test_malformed_instance_action_is_still_a_notice(aws: AWSSimulator) -> None:
    aws.inject(200, count=10_000, body="{not json", path=INSTANCE_ACTION)
    with _watch(AWSSource(aws.endpoint)) as watcher:
        notice = watcher.wait(5)
    assert notice is not None and notice.action == "terminate"
    assert notice.payload == "{not json"
    assert 115 < (notice.deadline - notice.detected_at).total_seconds() <= 120


# --------------------------------------------------------------------------- GCP


def test_gcp_preemption_detected_by_hanging_get(gcp: GCPSimulator) -> None:
    with _watch(GCPSource(gcp.host), poll_interval=2.0) as watcher:
        wait_until(lambda: gcp.count("GET", "/computeMetadata/v1/instance/preempted") >= 2, 10, what="a second GET")
        time.sleep(0.3)  # the watcher is now inside its second, hanging GET
        preempted = time.monotonic()
        gcp.preempt()
        notice = watcher.wait(5)
        latency = time.monotonic() - preempted
    assert notice is not None
    assert (notice.source, notice.action) == ("gcp", "terminate")
    assert latency < LOADED, f"{latency:.2f} s"  # the hanging GET returned at once, before the next 2 s poll
    assert 29 < (notice.deadline - notice.detected_at).total_seconds() <= 30


def test_gcp_maintenance_terminate(gcp: GCPSimulator) -> None:
    with _watch(GCPSource(gcp.host), poll_interval=0.5) as watcher:
        gcp.maintenance("MIGRATE_ON_HOST_MAINTENANCE")
        assert watcher.wait(1.2) is None  # a live migration keeps the VM
        gcp.maintenance("TERMINATE_ON_HOST_MAINTENANCE")
        notice = watcher.wait(5)
    assert notice is not None and notice.payload == {"maintenance-event": "TERMINATE_ON_HOST_MAINTENANCE"}


def test_gcp_stop_is_prompt_during_a_hanging_get(gcp: GCPSimulator) -> None:
    watcher = _watch(GCPSource(gcp.host), poll_interval=1.0).start()
    time.sleep(0.5)
    began = time.monotonic()
    watcher.stop()
    assert time.monotonic() - began < 2.0
    assert all(not t.is_alive() for t in threading.enumerate() if t.name.startswith("spotsafe-watcher"))


def test_gcp_no_false_notice_from_garbage_and_errors(gcp: GCPSimulator) -> None:
    gcp.inject(200, count=2, body="MAYBE", path="/computeMetadata/v1/instance/preempted")
    gcp.inject(500, count=2)
    with _watch(GCPSource(gcp.host), poll_interval=0.1) as watcher:
        wait_until(lambda: gcp.faults_pending == 0, 10, what="every fault served to the watcher")
        time.sleep(0.2)
        assert watcher.notice is None
        gcp.preempt()
        assert watcher.wait(5) is not None


def test_gcp_probe_wants_the_google_flavor(aws: AWSSimulator, gcp: GCPSimulator) -> None:
    assert GCPSource(gcp.host).probe(0.5) is True
    not_google = GCPSource(aws.host)
    try:
        assert not_google.probe(0.5) is False  # an HTTP server, but not a GCE metadata server
    finally:
        not_google.close()


# --------------------------------------------------------------------------- Azure


def test_azure_preempt_deadline_and_acknowledge(azure: AzureSimulator) -> None:
    with _watch(AzureSource(azure.endpoint)) as watcher:
        assert watcher.sources == ("azure",)
        time.sleep(POLL)
        scheduled = time.monotonic()
        event_id = azure.schedule_preempt(not_before_in=60)
        notice = watcher.wait(5)
        assert time.monotonic() - scheduled < POLL + LOADED  # within one poll interval
        assert notice is not None and (notice.source, notice.action) == ("azure", "terminate")
        assert notice.payload["EventId"] == event_id
        assert notice.deadline == parse_rfc1123(azure.document()["Events"][0]["NotBefore"])
        assert 55 < notice.time_left() <= 60
        watcher.acknowledge()
    assert azure.acknowledgements == [event_id]
    assert azure.document()["Events"][0]["EventStatus"] == "Started"


def test_azure_ignores_other_vms_and_other_event_types(azure: AzureSimulator) -> None:
    with _watch(AzureSource(azure.endpoint)) as watcher:
        azure.schedule_preempt(resources=["someone-else"])
        azure.schedule_event("Freeze")
        assert watcher.wait(POLL * 4) is None
        azure.schedule_event("Terminate", not_before_in=0, resources=[])  # empty Resources: everyone
        notice = watcher.wait(5)
    assert notice is not None and notice.payload["EventType"] == "Terminate"
    assert notice.time_left() > 20  # started, NotBefore empty: now + 30 s


def test_azure_no_false_notice_from_garbage(azure: AzureSimulator) -> None:
    azure.inject(200, count=2, body='{"DocumentIncarnation": ', path="/metadata/scheduledevents")
    azure.inject(500, count=2, path="/metadata/scheduledevents")
    with _watch(AzureSource(azure.endpoint), poll_interval=0.1) as watcher:
        wait_until(lambda: azure.faults_pending == 0, 10, what="every fault served to the watcher")
        time.sleep(0.2)
        assert watcher.notice is None
        azure.schedule_preempt()
        assert watcher.wait(5) is not None


def test_acknowledge_is_a_noop_elsewhere(aws: AWSSimulator) -> None:
    with _watch(AWSSource(aws.endpoint)) as watcher:
        watcher.acknowledge()  # nothing to acknowledge
        aws.arm()
        assert watcher.wait(5) is not None
        before = len(aws.requests)
        watcher.acknowledge()
        assert all(m == "GET" for m, _ in aws.requests[before:])


# --------------------------------------------------------------------------- auto detection


def test_auto_enables_every_source_that_answers(
    aws: AWSSimulator, gcp: GCPSimulator, azure: AzureSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.endpoint)
    monkeypatch.setenv("GCE_METADATA_HOST", gcp.host)
    monkeypatch.setenv("SPOTSAFE_AZURE_METADATA_ENDPOINT", azure.endpoint)
    with InterruptionWatcher(poll_interval=POLL) as watcher:
        assert watcher.sources == ("aws", "gcp", "azure", "signal")
        azure.schedule_preempt()
        notice = watcher.wait(5)
    assert notice is not None and notice.source == "azure"


@pytest.mark.parametrize("simulator", [AWSSimulator, GCPSimulator, AzureSimulator])
def test_auto_skips_servers_that_are_not_the_real_thing(simulator: type, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every source pointed at one provider's simulator (they share 169.254.169.254 in
    # real life): only that provider's source answers like itself.
    with simulator() as sim:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", sim.endpoint)
        monkeypatch.setenv("GCE_METADATA_HOST", sim.host)
        monkeypatch.setenv("SPOTSAFE_AZURE_METADATA_ENDPOINT", sim.endpoint)
        with InterruptionWatcher(poll_interval=POLL, signals=()) as watcher:
            assert watcher.sources == (sim.name,)


# --------------------------------------------------------------------------- signals, trigger, wait


def test_sigterm_in_process_chains_and_restores() -> None:
    calls: list[int] = []

    def previous(signum: int, frame: object) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with InterruptionWatcher("signal", signal_grace=45) as watcher:
            assert watcher.sources == ("signal",)
            os.kill(os.getpid(), signal.SIGTERM)
            notice = watcher.notice
            assert notice is not None
            assert (notice.source, notice.action, notice.payload) == ("signal", "terminate", {"signal": "SIGTERM"})
            assert (notice.deadline - notice.detected_at).total_seconds() == 45
            os.kill(os.getpid(), signal.SIGTERM)  # a second one: no exception, first notice kept
            assert watcher.notice is notice
        assert calls == [signal.SIGTERM, signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_stacked_watchers_stopped_out_of_order_defer_to_the_original_handler() -> None:
    calls: list[int] = []

    def original(signum: int, frame: object) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, original)
    try:
        first = InterruptionWatcher("signal").start()
        second = InterruptionWatcher("signal").start()
        os.kill(os.getpid(), signal.SIGTERM)
        assert second.notice is not None and first.notice is not None  # chained through both
        first.stop()  # out of order: second's handler stays installed
        second.stop()  # puts back first's (stale) handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM, signal.SIGTERM]  # the stale handler deferred to the original
        assert first._signal_queue.empty()
    finally:
        signal.signal(signal.SIGTERM, old)


def test_forked_children_keep_the_default_sigterm() -> None:
    # A DataLoader worker forked after start() inherits the handler; it must still die.
    with InterruptionWatcher("signal") as watcher:
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert watcher.notice is None  # the child's signal is not the parent's notice


def test_signal_wakes_wait_and_callback_runs_on_watcher_thread() -> None:
    threads: list[str] = []
    done = threading.Event()

    def callback(notice: Notice) -> None:
        threads.append(threading.current_thread().name)
        done.set()

    with InterruptionWatcher("signal", signals=(signal.SIGUSR1,), callback=callback) as watcher:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        notice = watcher.wait(5)
        assert notice is not None and notice.payload == {"signal": "SIGUSR1"}
        assert done.wait(5)
    assert threads == ["spotsafe-watcher"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_signals_skipped_outside_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    box: list[InterruptionWatcher] = []
    t = threading.Thread(target=lambda: box.append(InterruptionWatcher("signal").start()))
    t.start()
    t.join()
    try:
        assert box[0].sources == ()
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        box[0].stop()


def test_trigger_time_left_and_wait() -> None:
    watcher = InterruptionWatcher("none")
    assert watcher.time_left() is None
    assert watcher.wait(0.05) is None
    rebalance = watcher.trigger("rebalance")
    assert watcher.notice is rebalance
    assert watcher.wait(0.05, final=True) is None
    notice = watcher.trigger(deadline_in=10)
    assert watcher.notice is notice and notice.source == "manual"
    left = watcher.time_left()
    assert left is not None and 9 < left <= 10
    assert watcher.wait(final=True) is notice
    with pytest.raises(ValueError):
        watcher.trigger("explode")  # type: ignore[arg-type]


def test_stop_is_idempotent_and_restartable(aws: AWSSimulator) -> None:
    watcher = _watch(AWSSource(aws.endpoint))
    watcher.stop()  # never started: fine
    watcher.start()
    watcher.start()  # already started: same threads
    assert len([t for t in threading.enumerate() if t.name == "spotsafe-watcher-aws"]) == 1
    watcher.stop()
    watcher.stop()
    assert not any(t.name.startswith("spotsafe-watcher") for t in threading.enumerate())


SIGTERM_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from spotsafe.cloud.watcher import InterruptionWatcher

    with InterruptionWatcher(signal_grace=20) as watcher:
        print("ready", watcher.sources, flush=True)
        notice = watcher.wait(30)
        print("notice", notice.source, notice.action, round(watcher.time_left()), flush=True)
        # the "final save": a second SIGTERM arrives in the middle of it
        for _ in range(20):
            time.sleep(0.05)
        print("saved", flush=True)
    sys.exit(75)
    """
)


def test_sigterm_in_a_subprocess_does_not_abort_the_final_save() -> None:
    with child(
        [sys.executable, "-c", SIGTERM_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready ('signal',)"
        proc.send_signal(signal.SIGTERM)
        line = proc.stdout.readline().split()
        assert line[:3] == ["notice", "signal", "terminate"]
        assert 18 <= int(line[3]) <= 20
        proc.send_signal(signal.SIGTERM)  # during the save
        out, err = proc.communicate(timeout=30)
    assert out.strip() == "saved", f"{err}"
    assert proc.returncode == 75, f"{err}"


def test_auto_finds_imds_behind_a_hop_limit(aws: AWSSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    # In a container the token PUT's answer never arrives; IMDSv1 GETs still work.
    aws.inject(None, count=1000, delay=2.0, path="/latest/api/token")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.endpoint)
    with InterruptionWatcher(poll_interval=POLL, signals=(), probe_timeout=0.3) as watcher:
        assert watcher.sources == ("aws",)
        aws.arm("terminate")
        notice = watcher.wait(5)
    assert notice is not None and notice.action == "terminate"
