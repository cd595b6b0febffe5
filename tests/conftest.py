"""Fixtures every test gets.

No test may send a packet to a real cloud metadata address or anywhere off this
machine. Two layers keep it so:

1. the environment points every metadata source at a closed loopback port
   (subprocesses inherit it);
2. in this process, ``socket.connect`` refuses any address outside loopback.

tests/test_conftest.py proves both are in force.

The shared fixtures (moto's S3, EC2 and IAM, the metadata simulators, loop devices) are
in the plugins under tests/plugins/, registered here.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest

from tests.helpers import root_unavailable

pytest_plugins = ["tests.plugins.servers", "tests.plugins.devices", "tests.plugins.boot"]

#: A loopback port nothing listens on (the discard service is never run here):
#: connections are refused at once, so auto-detection settles fast.
CLOSED = "127.0.0.1:9"

OFFLINE_ENV = {
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{CLOSED}",
    "GCE_METADATA_HOST": CLOSED,
    "GCE_METADATA_IP": CLOSED,
    "SPOTSAFE_AZURE_METADATA_ENDPOINT": f"http://{CLOSED}",
    # azure-identity's managed identity credential asks this host for tokens (not 169.254.169.254).
    "AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://{CLOSED}",
    # Any boto3 client built without an explicit endpoint fails on loopback instead of
    # reaching for a real AWS service (botocore honours AWS_ENDPOINT_URL).
    "AWS_ENDPOINT_URL": f"http://{CLOSED}",
    # boto3's credential chain must never reach for an instance role.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class OffMachineConnection(AssertionError):
    pass


def _is_loopback(address: object) -> bool:
    if isinstance(address, str):  # AF_UNIX path
        return True
    if isinstance(address, tuple) and address:
        host = address[0]
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False  # an unresolved name: refuse, it could go anywhere
    return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: object) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise OffMachineConnection(f"test tried to connect off this machine: {address!r}")
    return _real_connect(self, address)  # type: ignore[arg-type]


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise OffMachineConnection(f"test tried to connect off this machine: {address!r}")
    return _real_connect_ex(self, address)  # type: ignore[arg-type]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than this process may use cores, at most four.

    Most of the suite's time is end-to-end runs waiting on child processes (torchrun jobs,
    supervised relaunches, boot scripts, deadlines): on two cores, two workers left a third
    of the CPU idle (627 s) where three kept it ~93% busy (426 s). More than four only adds
    contention to the timing-bound tests.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores + 1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the ``root`` tests run one at a time on one worker: they share the
    machine's loop devices and mount table."""
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(pytest.mark.xdist_group("root"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.root`` tests (loop devices, mount, mkfs) skip, saying why, where they cannot run."""
    if item.get_closest_marker("root") is not None:
        reason = root_unavailable()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Point every metadata source at loopback and forbid off-machine connections."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_EC2_METADATA_DISABLED", "SPOTSAFE_STORE", "SPOTSAFE_SOURCES", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    yield dict(OFFLINE_ENV)
