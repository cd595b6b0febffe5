"""The servers tests talk to, as fixtures: moto's S3, EC2 and IAM on loopback, and the metadata simulators.

Registered in tests/conftest.py (``pytest_plugins``): a test asks for a fixture by name.
The servers themselves are in tests/s3server.py and tests/ec2server.py.

S3 (tests/s3server.py):

- ``moto_server`` (session): ``ThreadedMotoServer`` on 127.0.0.1, port chosen by the OS.
- ``s3_client`` (function): a plain boto3 client on it.
- ``s3_bucket`` (function): a fresh bucket with a unique name.
- ``s3_options`` (function): storage_options that point a store straight at the moto server.
- ``s3_proxy`` (function): a :class:`~tests.s3server.FaultProxy` in front of the moto server.
- ``s3_proxy_options`` (function): storage_options through the fault proxy, with short timeouts.

EC2 (tests/ec2server.py):

- ``ec2_server`` (module): an :class:`~tests.ec2server.EC2Server`. Its state is shared
  within the module: tests use unique tags (see ``unique_tag``).
- ``ec2`` (function): a boto3 EC2 client on it.
- ``launch(az)`` (function): run an instance in an availability zone, return its id.
- ``iam_server`` (module): an :class:`~tests.ec2server.IAMEnforcingServer` (moto with IAM checks on).

Compute Engine and Azure Resource Manager (tests/gcefake.py, tests/armfake.py), one per test:

- ``compute_fake``: a :class:`~tests.gcefake.ComputeFake` (plain HTTP, as google-cloud-compute's
  REST transport allows for an ``api_endpoint`` given with its scheme).
- ``arm_fake``: an :class:`~tests.armfake.ARMFake` over TLS; ``arm_fake.ca`` is the PEM file to
  trust it with (``REQUESTS_CA_BUNDLE``).

Instance metadata (spotsafe.rehearsal.simulators), one per test:

- ``aws`` (IMDSv1 and v2), ``aws_v2`` (IMDSv2 only), ``gcp``, ``azure``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from tests.armfake import ARMFake, self_signed
from tests.ec2server import EC2Server, IAMEnforcingServer, run_instance
from tests.gcefake import ComputeFake
from tests.s3server import FaultProxy, MotoServer

# --------------------------------------------------------------------------- S3

_names = itertools.count()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def s3_client(moto_server: MotoServer, offline: dict[str, str]) -> Iterator[Any]:
    """A plain boto3 client on the moto server (to look behind the store's back)."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket name."""
    name = f"spotsafe-test-{next(_names)}-{time.monotonic_ns() % 10**9}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_options(moto_server: MotoServer) -> dict[str, Any]:
    """storage_options that point a store straight at the moto server."""
    return {"endpoint_url": moto_server.endpoint, "region_name": "us-east-1"}


@pytest.fixture
def s3_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_server.endpoint).start()
    try:
        yield proxy
    finally:
        proxy.shutdown()


@pytest.fixture
def s3_proxy_options(s3_proxy: FaultProxy) -> dict[str, Any]:
    """storage_options through the fault proxy, with short timeouts."""
    return {
        "endpoint_url": s3_proxy.endpoint,
        "region_name": "us-east-1",
        "connect_timeout": 2,
        "read_timeout": 10,
    }


# --------------------------------------------------------------------------- EC2 and IAM


@pytest.fixture(scope="module")
def ec2_server() -> Iterator[EC2Server]:
    server = EC2Server().start()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def ec2(ec2_server: EC2Server) -> Any:
    return ec2_server.client("ec2")


@pytest.fixture
def launch(ec2: Any) -> Callable[..., str]:
    def _launch(az: str = "us-east-1a") -> str:
        return run_instance(ec2, az)

    return _launch


@pytest.fixture(scope="module")
def iam_server() -> Iterator[IAMEnforcingServer]:
    server = IAMEnforcingServer()
    try:
        yield server
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- instance metadata


@pytest.fixture
def aws() -> Iterator[AWSSimulator]:
    with AWSSimulator() as sim:
        yield sim


@pytest.fixture
def aws_v2() -> Iterator[AWSSimulator]:
    with AWSSimulator(require_token=True) as sim:
        yield sim


@pytest.fixture
def gcp() -> Iterator[GCPSimulator]:
    with GCPSimulator() as sim:
        yield sim


@pytest.fixture
def azure() -> Iterator[AzureSimulator]:
    with AzureSimulator() as sim:
        yield sim


# --------------------------------------------------------------------------- Compute Engine, ARM


@pytest.fixture
def compute_fake() -> Iterator[ComputeFake]:
    fake = ComputeFake()
    fake.start()
    try:
        yield fake
    finally:
        fake.shutdown()


@pytest.fixture
def arm_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ARMFake]:
    tls, ca = self_signed(tmp_path_factory.mktemp("arm-tls"))
    fake = ARMFake(tls, ca)
    fake.start()
    try:
        yield fake
    finally:
        fake.shutdown()
