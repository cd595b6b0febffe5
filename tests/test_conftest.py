"""The offline fixture is in force: nothing can reach a real metadata address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from spotsafe.settings import Settings
from tests.conftest import OffMachineConnection


@pytest.mark.parametrize("host", ["169.254.169.254", "8.8.8.8", "10.0.0.1"])
def test_connect_off_machine_is_refused(host: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        with pytest.raises(OffMachineConnection):
            s.connect((host, 80))
        with pytest.raises(OffMachineConnection):
            s.connect_ex((host, 80))


def test_every_metadata_source_points_at_loopback() -> None:
    settings = Settings.from_env()
    assert settings.aws_endpoint == "http://127.0.0.1:9"
    assert settings.gcp_host == "127.0.0.1:9"
    assert settings.azure_endpoint == "http://127.0.0.1:9"
    assert "169.254" not in settings.aws_endpoint
    assert "google.internal" not in settings.gcp_host


def test_subprocesses_inherit_the_loopback_endpoints() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; print(os.environ['AWS_EC2_METADATA_SERVICE_ENDPOINT'], os.environ['GCE_METADATA_HOST'])",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    ).stdout.split()
    assert out == ["http://127.0.0.1:9", "127.0.0.1:9"]


def test_loopback_still_works() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2):
            pass


def test_signal_grace_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotsafe.cloud.watcher import InterruptionWatcher

    assert Settings.from_env().signal_grace == 30.0
    monkeypatch.setenv("SPOTSAFE_SIGNAL_GRACE", "90")
    assert InterruptionWatcher(sources=[]).signal_grace == 90.0
    assert InterruptionWatcher(sources=[], signal_grace=5).signal_grace == 5.0
    monkeypatch.setenv("SPOTSAFE_SIGNAL_GRACE", "soon")
    with pytest.raises(ValueError, match="SPOTSAFE_SIGNAL_GRACE"):
        Settings.from_env()
