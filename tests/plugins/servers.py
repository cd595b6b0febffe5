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

GCS and Azure Blob (tests/cloudservers.py), configured only through the clouds' own environment:

- ``gcs_server`` (session): fake-gcs-server (honours ``ifGenerationMatch``); ``gcs_env``
  (function): ``STORAGE_EMULATOR_HOST`` pointed at it; ``gcs_bucket`` (function): a fresh bucket.
- ``gcs_ignoring`` (session): gcp-storage-emulator, which ignores preconditions; ``gcs_ignoring_bucket``
  (function): ``STORAGE_EMULATOR_HOST`` pointed at it and a fresh bucket there.
- ``azurite`` (session): azurite's blob service (skipped, saying why, only when azurite is not
  installed: ``npm install azurite``; found through ``SPOTSAFE_AZURITE``, ``PATH`` or /opt/azurite);
  ``az_env`` (function): ``AZURE_STORAGE_CONNECTION_STRING`` for it; ``az_container``: a fresh container.
Compute Engine and Azure Resource Manager (tests/gcefake.py, tests/armfake.py), one per test:

- ``compute_fake``: a :class:`~tests.gcefake.ComputeFake` (plain HTTP, as google-cloud-compute's
  REST transport allows for an ``api_endpoint`` given with its scheme).
- ``arm_fake``: an :class:`~tests.armfake.ARMFake` over TLS; ``arm_fake.ca`` is the PEM file to
  trust it with (``REQUESTS_CA_BUNDLE``).
- ``billing_fake``, ``retail_prices_fake``: the Cloud Billing Catalog API and the Azure Retail
  Prices API (tests/pricefake.py), plain HTTP.

Instance metadata (spotsafe.rehearsal.simulators), one per test:

- ``aws`` (IMDSv1 and v2), ``aws_v2`` (IMDSv2 only), ``gcp``, ``azure``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest

from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from tests.armfake import ARMFake, self_signed
from tests.cloudservers import Azurite, FakeGCSServer, GCPStorageEmulator, azurite_blob
from tests.ec2server import EC2Server, IAMEnforcingServer, run_instance
from tests.gcefake import ComputeFake
from tests.pricefake import BillingFake, RetailPricesFake
from tests.s3server import FaultProxy, MotoServer


class _Server(Protocol):
    def shutdown(self) -> None: ...


Server = TypeVar("Server", bound=_Server)


def serving(server: Server) -> Iterator[Server]:
    """Each fixture's body: start ``server`` (unless it started when made), yield it, shut it down however the test ends."""
    start = getattr(server, "start", None)
    if start is not None:
        start()
    try:
        yield server
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- S3

_names = itertools.count()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    yield from serving(MotoServer())


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
    yield from serving(FaultProxy(moto_server.endpoint))


@pytest.fixture
def s3_proxy_options(s3_proxy: FaultProxy) -> dict[str, Any]:
    """storage_options through the fault proxy, with short timeouts."""
    return {
        "endpoint_url": s3_proxy.endpoint,
        "region_name": "us-east-1",
        "connect_timeout": 2,
        "read_timeout": 10,
    }


# --------------------------------------------------------------------------- GCS and Azure Blob


def unique_name() -> str:
    """A bucket or container name no other test of this session uses (lower case, 3-63 characters)."""
    return f"spotsafe-test-{next(_names)}-{time.monotonic_ns() % 10**9}"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCSServer]:
    yield from serving(FakeGCSServer())


@pytest.fixture
def gcs_env(gcs_server: FakeGCSServer, offline: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``STORAGE_EMULATOR_HOST`` pointed at fake-gcs-server (subprocesses inherit it); its endpoint."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    return gcs_server.endpoint


def _gcs_create_bucket(endpoint: str) -> str:
    import requests

    name = unique_name()
    response = requests.post(f"{endpoint}/storage/v1/b?project=spotsafe", json={"name": name}, timeout=30)
    response.raise_for_status()
    return name


@pytest.fixture
def gcs_bucket(gcs_env: str) -> str:
    """A fresh, empty bucket on fake-gcs-server."""
    return _gcs_create_bucket(gcs_env)


@pytest.fixture(scope="session")
def gcs_ignoring() -> Iterator[GCPStorageEmulator]:
    yield from serving(GCPStorageEmulator())


@pytest.fixture
def gcs_ignoring_bucket(
    gcs_ignoring: GCPStorageEmulator, offline: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """A fresh bucket on gcp-storage-emulator (it ignores ifGenerationMatch), ``STORAGE_EMULATOR_HOST`` set to it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_ignoring.endpoint)
    return _gcs_create_bucket(gcs_ignoring.endpoint)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    script = azurite_blob()
    if script is None:
        pytest.skip("azurite is not installed (npm install azurite; or set SPOTSAFE_AZURITE to its azurite-blob)")
    yield from serving(Azurite(script))


@pytest.fixture
def az_env(azurite: Azurite, offline: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``AZURE_STORAGE_CONNECTION_STRING`` for azurite (subprocesses inherit it); the string."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    return azurite.connection_string


@pytest.fixture
def az_container(az_env: str) -> str:
    """A fresh, empty container on azurite."""
    from azure.storage.blob import BlobServiceClient

    name = unique_name()
    with BlobServiceClient.from_connection_string(az_env) as service:
        service.create_container(name)
    return name


# --------------------------------------------------------------------------- EC2 and IAM


@pytest.fixture(scope="module")
def ec2_server() -> Iterator[EC2Server]:
    yield from serving(EC2Server())


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
    yield from serving(IAMEnforcingServer())  # started when made


# --------------------------------------------------------------------------- instance metadata


@pytest.fixture
def aws() -> Iterator[AWSSimulator]:
    yield from serving(AWSSimulator())


@pytest.fixture
def aws_v2() -> Iterator[AWSSimulator]:
    yield from serving(AWSSimulator(require_token=True))


@pytest.fixture
def gcp() -> Iterator[GCPSimulator]:
    yield from serving(GCPSimulator())


@pytest.fixture
def azure() -> Iterator[AzureSimulator]:
    yield from serving(AzureSimulator())


# --------------------------------------------------------------------------- Compute Engine, ARM


@pytest.fixture
def compute_fake() -> Iterator[ComputeFake]:
    yield from serving(ComputeFake())


@pytest.fixture
def arm_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ARMFake]:
    tls, ca = self_signed(tmp_path_factory.mktemp("arm-tls"))
    yield from serving(ARMFake(tls, ca))


@pytest.fixture
def billing_fake() -> Iterator[BillingFake]:
    yield from serving(BillingFake())


@pytest.fixture
def retail_prices_fake() -> Iterator[RetailPricesFake]:
    yield from serving(RetailPricesFake())
