"""Off the cloud the watcher settles at once and then costs (next to) nothing.

Resource bounds, not speed targets: start-up well under the probes' deadline with no metadata
server answering (refused: under 1 s; hanging: bounded by :func:`probe_bound`), and an idle CPU
cost under 0.5% of one core.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from spotsafe.cloud.watcher import InterruptionWatcher, probe_bound
from tests.helpers import child, wait_until

IDLE_CPU_BOUND = 0.005  # of one core


def _watcher_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("spotsafe-"))


def test_start_up_with_nothing_listening_is_instant() -> None:
    began = time.monotonic()
    watcher = InterruptionWatcher().start()  # auto: every endpoint is the closed port 127.0.0.1:9
    elapsed = time.monotonic() - began
    try:
        assert watcher.sources == ("signal",)
        assert elapsed < 1.0
        # nothing to poll: no poller thread, only the dispatcher asleep on its socket
        assert _watcher_threads() == ["spotsafe-watcher"]
    finally:
        watcher.stop()
    assert _watcher_threads() == []


def test_auto_start_only_touches_the_loopback_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    targets: list[object] = []
    guarded = socket.socket.connect  # the offline fixture's guard

    def recording(self: socket.socket, address: object) -> None:
        targets.append(address)
        return guarded(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    with InterruptionWatcher() as watcher:
        assert watcher.sources == ("signal",)
    assert targets  # the probes did try (and were refused at once)
    assert set(targets) == {("127.0.0.1", 9)}


def test_start_up_with_hanging_hosts_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listener that never accepts: connections succeed (kernel backlog), nothing answers.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        host = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://{host}")
        monkeypatch.setenv("GCE_METADATA_HOST", host)
        monkeypatch.setenv("SPOTSAFE_AZURE_METADATA_ENDPOINT", f"http://{host}")
        began = time.monotonic()
        watcher = InterruptionWatcher(signals=()).start()
        elapsed = time.monotonic() - began
        bound = probe_bound(watcher.probe_timeout)
        try:
            assert watcher.sources == ()
        finally:
            watcher.stop()
        # let the probes that gave up finish and close their connections
        wait_until(
            lambda: not any(n.startswith("spotsafe-probe") for n in _watcher_threads()), 10, what="the probes to end"
        )
    # the probes end at their own timeouts (0.75 s) or the deadline cuts them off; the half
    # second over it is for the threads a loaded machine is slow to start and join
    assert elapsed < bound + 0.5, f"{elapsed:.2f} s (the probes' deadline: {bound:.2f} s)"


def test_start_up_in_a_fresh_process() -> None:
    code = (
        "import time; t = time.monotonic(); "
        "from spotsafe.cloud.watcher import InterruptionWatcher; "
        "i = time.monotonic(); w = InterruptionWatcher().start(); s = time.monotonic(); "
        "print(round(i - t, 3), round(s - i, 3), ','.join(w.sources)); w.stop()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ.copy(), timeout=60
    ).stdout.split()
    assert out[2] == "signal"
    imported, started = float(out[0]), float(out[1])
    # refused probes end at once: start() takes far less than the probes' deadline it would
    # wait out if they hung (the import is timed apart: on a loaded machine it takes seconds)
    assert started < 1.0, f"start() took {started} s"
    assert imported < 10.0, f"the import took {imported} s"


def _thread_cpu_ns(threads: list[threading.Thread]) -> int | None:
    """CPU time of these threads (Linux schedstat, ns), or None where unavailable."""
    total = 0
    for t in threads:
        try:
            with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return total


def _idle_cpu(seconds: float) -> float:
    """Fraction of one core the watcher's threads used while the main thread slept.

    Counted per thread where Linux tells (so other tests' leftovers do not count),
    else for the whole process.
    """
    threads = [t for t in threading.enumerate() if t.name.startswith("spotsafe-watcher")]
    assert threads
    before_threads = _thread_cpu_ns(threads)
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - wall
    after_threads = _thread_cpu_ns(threads)
    if before_threads is not None and after_threads is not None:
        return (after_threads - before_threads) / 1e9 / elapsed
    return (time.process_time() - cpu) / elapsed


def test_idle_cpu_off_cloud() -> None:
    with InterruptionWatcher() as watcher:
        assert watcher.sources == ("signal",)
        time.sleep(0.2)
        assert _idle_cpu(2.0) < IDLE_CPU_BOUND


@pytest.fixture
def aws_in_another_process() -> Iterator[str]:
    """The simulator's own CPU must not count: it runs in a child process."""
    with child(
        [sys.executable, "-m", "spotsafe.simulate", "aws"],
        grace=10,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("export AWS_EC2_METADATA_SERVICE_ENDPOINT=")
        yield line.split("=", 1)[1]


def test_idle_cpu_while_polling_aws(aws_in_another_process: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws_in_another_process)
    with InterruptionWatcher() as watcher:  # the default 2 s poll interval
        assert watcher.sources == ("aws", "signal")
        time.sleep(0.3)
        used = _idle_cpu(4.0)
        assert watcher.notice is None
    assert used < IDLE_CPU_BOUND
