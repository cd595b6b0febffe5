"""The ``bootbox`` fixture: one VM of a cloud in a sandbox, for userdata/spot-boot.sh (registered in tests/conftest.py).

``bootbox`` is parametrized over ``gcp`` and ``azure``; a test of another set of clouds says so
with ``@pytest.mark.parametrize("bootbox", ["aws"], indirect=True)``. Each cloud's servers come
from tests/plugins/servers.py (moto's EC2; the Compute Engine and ARM fakes), the disk from
``loopdev`` (tests/plugins/devices.py): only for ``@pytest.mark.root`` tests. What a box is and
holds: tests/bootbox.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cloud.aws.volume.filesystem import mounted_at
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from spotsafe.rehearsal.simulators.server import Simulator
from tests.bootbox import PROJECT, TRAIN_PY, ZONE, BootBox, bare_env, code_remote
from tests.ec2server import AMI, unique_tag
from tests.volumes import fake_nvme


def _aws(request: pytest.FixtureRequest, box: BootBox) -> tuple[Simulator, dict[str, str]]:
    """The "instance" (launched by a persistent spot request, as the boot script expects), its volume, its NVMe disk."""
    ec2_server = request.getfixturevalue("ec2_server")
    ec2 = box.api = request.getfixturevalue("ec2")
    r = ec2.request_spot_instances(
        InstanceCount=1, Type="persistent", LaunchSpecification={"ImageId": AMI, "InstanceType": "g5.xlarge"}
    )
    box.request_id = r["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
    req = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[box.request_id])["SpotInstanceRequests"][0]
    iid = req["InstanceId"]
    az = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["Placement"]["AvailabilityZone"]
    box.volume_id = ec2.create_volume(
        AvailabilityZone=az,
        Size=1,
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "spotsafe-run", "Value": box.run}]}],
    )["VolumeId"]
    sys_root, dev_root = fake_nvme(box.root, box.volume_id.replace("-", ""), box.device)
    sim = AWSSimulator(instance_id=iid, availability_zone=az).start()
    return sim, {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
        "AWS_ENDPOINT_URL_EC2": ec2_server.endpoint,
        "AWS_ENDPOINT_URL_AUTO_SCALING": ec2_server.endpoint,
        # Every other AWS service too: nothing may leave this machine.
        "AWS_ENDPOINT_URL": ec2_server.endpoint,
        "SPOTSAFE_MOVE": "0",
        "SPOTSAFE_VOLUME_ARGS": f"--sys-root {sys_root} --dev-root {dev_root} --poll-interval 0.1 "
        "--metadata-timeout 10",
    }


def _disk_link(box: BootBox, name: str) -> Path:
    """What udev makes on a GCP / Azure VM: a link, named for the disk, to the block device."""
    disk_dir = box.root / "disk-links"
    disk_dir.mkdir()
    (disk_dir / name).symlink_to(box.device)
    return disk_dir


def _gcp(request: pytest.FixtureRequest, box: BootBox) -> tuple[Simulator, dict[str, str]]:
    """A VM of a managed instance group of one, its stateful disk by device name."""
    sim = GCPSimulator(group=box.run, zone=ZONE, project_id=PROJECT).start()
    box.api = request.getfixturevalue("compute_fake")
    box.api.add_group(PROJECT, ZONE, box.run)
    return sim, {
        "GCE_METADATA_HOST": sim.host,
        "GCE_METADATA_IP": sim.host,
        "SPOTSAFE_GCP_COMPUTE_ENDPOINT": box.api.endpoint,
        "SPOTSAFE_DISK_DIR": str(_disk_link(box, f"google-spotsafe-{box.run}")),
    }


def _azure(request: pytest.FixtureRequest, box: BootBox) -> tuple[Simulator, dict[str, str]]:
    """A VM of a Flexible scale set of one, its data disk at LUN 0."""
    sim = AzureSimulator(scale_set=box.run).start()
    box.api = request.getfixturevalue("arm_fake")
    box.api.add_scale_set(sim.subscription_id, sim.resource_group, box.run)
    return sim, {
        "SPOTSAFE_AZURE_METADATA_ENDPOINT": sim.endpoint,
        "AZURE_POD_IDENTITY_AUTHORITY_HOST": sim.endpoint,
        "SPOTSAFE_AZURE_ARM_ENDPOINT": box.api.endpoint,
        "REQUESTS_CA_BUNDLE": str(box.api.ca),
        "SPOTSAFE_DISK_DIR": str(_disk_link(box, "lun0")),
    }


_CLOUDS: dict[str, Callable[[pytest.FixtureRequest, BootBox], tuple[Simulator, dict[str, str]]]] = {
    "aws": _aws,
    "gcp": _gcp,
    "azure": _azure,
}


@pytest.fixture(params=["gcp", "azure"])
def bootbox(request: pytest.FixtureRequest, tmp_path: Path, loopdev: Callable[..., str]) -> Iterator[BootBox]:
    """A VM of the cloud ``request.param`` whose boot script finds its disk, code, metadata and API here."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    cloud = str(request.param)
    run = unique_tag() if cloud == "aws" else f"run{os.getpid()}{tmp_path.name[-6:]}".replace("_", "")
    remote, commit = code_remote(tmp_path, tmp_path / "work", {"train.py": TRAIN_PY})
    mount = tmp_path / "mnt"
    box = BootBox(cloud, tmp_path, {}, loopdev(size_mb=64), mount, run, tmp_path / "steps.log", commit, None, None)
    sim: Any = None
    try:
        sim, cloud_env = _CLOUDS[cloud](request, box)
        box.sim = sim
        box.env = {
            **bare_env(tmp_path),
            **cloud_env,
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "SPOTSAFE_RUN": run,
            "SPOTSAFE_MOUNT": str(mount),
            "SPOTSAFE_REPO": f"file://{remote}",
            "SPOTSAFE_REF": "main",
            "SPOTSAFE_PYTHON": sys.executable,
            "SPOTSAFE_TRAIN_COMMAND": "python train.py",
            "SPOTSAFE_FSTAB": "0",
            "SPOTSAFE_SHUTDOWN_WHEN_DONE": "1",
            "SPOTSAFE_SOURCES": f"{cloud},signal",
            "STEPS_FILE": str(box.steps),
            "TRAIN_TAG": "second",
        }
        yield box
    finally:
        if sim is not None:
            sim.shutdown()
        if mounted_at(str(mount)) is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)
