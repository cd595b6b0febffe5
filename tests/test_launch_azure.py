"""spotsafe's Azure launcher (spotsafe.cloud.azure.launch) against tests/armfake.py, a local ARM fake over TLS.

azure-mgmt-compute talks to the fake as to management.azure.com (``base_url``; the fake's
certificate trusted through ``REQUESTS_CA_BUNDLE``); every request body is checked against the
Microsoft.Compute REST reference there. Not run against Azure itself.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from spotsafe.cloud.azure.launch.up import CUSTOM_DATA_LIMIT, Arm, AzureLaunchSpec, custom_data, down, launch
from spotsafe.errors import LaunchConfigError, LaunchError
from tests.armfake import ARMFake

SUB, RG = "00000000-0000-0000-0000-0000000000aa", "spotsafe-test"
SUBNET = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/virtualNetworks/v/subnets/default"


def _spec(**overrides: Any) -> AzureLaunchSpec:
    base: dict[str, Any] = {
        "name": "mnist",
        "resource_group": RG,
        "location": "eastus",
        "vm_size": "Standard_NC4as_T4_v3",
        "image": "microsoft-dsvm:ubuntu-hpc:2204:latest",
        "subnet_id": SUBNET,
        "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIspotsafe test",
        "command": "python train.py",
        "store": "az://runs/mnist",
        "storage_account": "spotsafeckpt",
        "pip_spec": "git+https://example.invalid/spotsafe.git@" + "0" * 40,
    }
    base.update(overrides)
    return AzureLaunchSpec(**base)


class _Token:
    """A bearer token credential for the fake (azure-core's TokenCredential protocol)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken("fake-arm-token", 4102444800)


@pytest.fixture
def arm(arm_fake: ARMFake, monkeypatch: pytest.MonkeyPatch) -> Iterator[Arm]:
    from azure.mgmt.authorization import AuthorizationManagementClient
    from azure.mgmt.compute import ComputeManagementClient

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(arm_fake.ca))
    arm_fake.add_storage_account(SUB, RG, "spotsafeckpt")
    # No retries: a lost answer is the launching process dying after its call, not a blip to retry.
    client = ComputeManagementClient(_Token(), SUB, base_url=arm_fake.endpoint, retry_total=0)  # type: ignore[arg-type]
    auth = AuthorizationManagementClient(_Token(), SUB, base_url=arm_fake.endpoint, retry_total=0)  # type: ignore[arg-type]
    try:
        yield Arm(client, RG, auth=auth, subscription=SUB)
    finally:
        client.close()
        auth.close()


def _quiet(_: Any) -> None:
    pass


def test_plan_then_launch_creates_one_spot_vm_scale_set(arm_fake: ARMFake, arm: Arm) -> None:
    plan = launch(_spec(), arm, apply=False, on_step=_quiet)
    assert [(s.verb, s.kind) for s in plan.steps] == [
        ("create", "scale set"),
        ("create", "role assignment"),
        ("create", "role assignment"),
    ]
    assert arm_fake.calls("PUT", r".*") == []
    launch(_spec(), arm, apply=True, on_step=_quiet)
    assert arm_fake.violations == []
    ((_, _, _, body),) = arm_fake.calls("PUT", r".*/virtualMachineScaleSets/[^/]+")
    vm = body["properties"]["virtualMachineProfile"]
    assert body["properties"]["orchestrationMode"] == "Flexible" and body["sku"]["capacity"] == 1
    assert vm["priority"] == "Spot" and vm["evictionPolicy"] == "Delete"
    assert body["identity"] == {"type": "SystemAssigned"}
    assert body["tags"]["spotsafe-run"] == "mnist"
    assert base64.b64decode(vm["osProfile"]["customData"]).decode() == custom_data(_spec())
    assert "SPOTSAFE_CLOUD=azure" in custom_data(_spec())
    assert all(a == "Bearer fake-arm-token" for a in arm_fake.authorizations)
    again = launch(_spec(), arm, apply=True, on_step=_quiet)
    assert again.changes == [] and len(arm_fake.calls("PUT", r".*")) == 3


@pytest.mark.parametrize("nth", [0, 1, 2])
def test_a_launch_cut_after_each_creating_call_is_completed_by_the_next(arm_fake: ARMFake, arm: Arm, nth: int) -> None:
    """PUT 0: the scale set; 1, 2: the role assignments. The work was done, the answer lost: rerun."""
    routes = [f"{m} {rx.pattern}" for m, rx, _ in arm_fake.routes if m == "PUT"]
    vmss, assignment = routes  # the scale set's PUT, the role assignments' PUT
    if nth == 0:
        arm_fake.crash_after[vmss] = 1
    else:
        arm_fake.crash_after[assignment] = nth  # the nth assignment's answer is lost (the first ones too)
    with pytest.raises(LaunchError):
        launch(_spec(), arm, apply=True, on_step=_quiet)
    arm_fake.crash_after.clear()
    launch(_spec(), arm, apply=True, on_step=_quiet)
    assert len(arm_fake.scale_sets) == 1 and len(arm_fake.role_assignments) == 2
    assert launch(_spec(), arm, apply=True, on_step=_quiet).changes == []
    assert len(arm_fake.calls("PUT", r".*/virtualMachineScaleSets/[^/]+")) == 1 and arm_fake.violations == []


def test_the_scale_sets_identity_gets_only_its_scale_set_and_its_container(arm_fake: ARMFake, arm: Arm) -> None:
    launch(_spec(), arm, apply=True, on_step=_quiet)
    ((_, _, name), vmss) = next(iter(arm_fake.scale_sets.items()))
    principal = vmss["identity"]["principalId"]
    got = {a["properties"]["scope"]: a["properties"] for a in arm_fake.role_assignments.values()}
    scale_set = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    container = (
        f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Storage/storageAccounts/spotsafeckpt"
        "/blobServices/default/containers/runs"
    )
    assert set(got) == {scale_set, container}
    assert got[scale_set]["roleDefinitionId"].endswith("/roleDefinitions/9980e02c-c2be-4d73-94e8-173b1dc7cf3c")
    assert got[container]["roleDefinitionId"].endswith("/roleDefinitions/ba92f5b4-2d11-453d-a403-e96b0029c9fe")
    assert {p["principalId"] for p in got.values()} == {principal}
    assert {p["principalType"] for p in got.values()} == {"ServicePrincipal"}
    assert "AZURE_STORAGE_ACCOUNT_NAME=spotsafeckpt" in custom_data(_spec())
    _, left = down("mnist", arm, apply=True, on_step=_quiet)
    assert left == [] and arm_fake.role_assignments == {} and arm_fake.scale_sets == {}
    assert arm_fake.violations == []


def test_a_data_disk_run_is_evicted_deallocated_and_keeps_its_disk(arm_fake: ARMFake, arm: Arm) -> None:
    spec = _spec(store="/mnt/spotsafe/mnist", disk_size=64, storage_account=None)
    plan = launch(spec, arm, apply=False, on_step=_quiet)
    assert [(s.verb, s.kind) for s in plan.steps] == [("create", "scale set"), ("create", "role assignment")]
    launch(spec, arm, apply=True, on_step=_quiet)
    ((_, _, _, body),) = arm_fake.calls("PUT", r".*/virtualMachineScaleSets/[^/]+")
    vm = body["properties"]["virtualMachineProfile"]
    assert vm["evictionPolicy"] == "Deallocate"
    (disk,) = vm["storageProfile"]["dataDisks"]
    assert (disk["lun"], disk["createOption"], disk["diskSizeGB"], disk["deleteOption"]) == (0, "Empty", 64, "Detach")
    settings = custom_data(spec).split("\n\n", 1)[0]  # the settings, before spot-boot.sh
    assert "SPOTSAFE_DISK_LUN=0" in settings and "SPOTSAFE_MKFS=1" in settings
    assert "SPOTSAFE_ATTACH" not in settings and "SPOTSAFE_MOUNT=/mnt/spotsafe" in settings
    assert len(arm_fake.role_assignments) == 1  # no container to reach
    # down keeps the checkpoints' disk unless asked, and says so.
    plan, _ = down("mnist", arm, apply=False, on_step=_quiet)
    assert [(s.verb, s.kind) for s in plan.steps] == [
        ("delete", "role assignment"),
        ("delete", "scale set"),
        ("keep", "disk"),
    ]
    _, left = down("mnist", arm, apply=True, on_step=_quiet)
    assert left == [] and len(arm_fake.disks) == 1
    _, left = down("mnist", arm, apply=True, delete_store=True, on_step=_quiet)
    assert left == [] and arm_fake.disks == {} and arm_fake.violations == []


def test_a_changed_launch_is_refused(arm_fake: ARMFake, arm: Arm) -> None:
    launch(_spec(), arm, apply=True, on_step=_quiet)
    with pytest.raises(LaunchError, match="other settings"):
        launch(_spec(command="python other.py"), arm, apply=True, on_step=_quiet)


def test_down_leaves_nothing_tagged_and_a_cut_down_is_completed(arm_fake: ARMFake, arm: Arm) -> None:
    launch(_spec(), arm, apply=True, on_step=_quiet)
    plan, _ = down("mnist", arm, apply=False, on_step=_quiet)
    assert [s.verb for s in plan.steps] == ["delete"] * 3 and arm_fake.calls("DELETE", r".*") == []
    delete = next(f"{m} {rx.pattern}" for m, rx, _ in arm_fake.routes if m == "DELETE")  # the scale set's
    arm_fake.crash_after[delete] = 1
    with pytest.raises(LaunchError):
        down("mnist", arm, apply=True, on_step=_quiet)
    _, left = down("mnist", arm, apply=True, on_step=_quiet)
    assert left == [] and arm_fake.scale_sets == {}
    assert arm_fake.violations == []


def test_a_scale_set_spotsafe_did_not_make_is_left_alone(arm_fake: ARMFake, arm: Arm) -> None:
    arm_fake.add_scale_set(SUB, RG, "spotsafe-mnist")
    with pytest.raises(LaunchError, match="did not create"):
        launch(_spec(), arm, apply=True, on_step=_quiet)
    _, left = down("mnist", arm, apply=True, on_step=_quiet)
    assert left == ["scale set spotsafe-mnist"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Bad_Name"}, "run name"),
        ({"store": "/mnt/x"}, "az://CONTAINER"),
        ({"store": "/mnt/x", "disk_size": 64}, "a directory under /mnt/spotsafe"),
        ({"storage_account": None}, "--storage-account"),
        ({"image": "ubuntu"}, "publisher:offer:sku:version"),
        ({"subnet_id": "default"}, "--subnet-id"),
    ],
)
def test_bad_input_is_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(LaunchConfigError, match=message):
        _spec(**overrides).validate()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["properties"]["virtualMachineProfile"].update(evictionPolicyy="Delete"), "not a field"),
        (lambda b: b["properties"]["virtualMachineProfile"].update(priority="Cheap"), "documented values"),
        (lambda b: b["sku"].update(capacity="one"), "integer"),
        (lambda b: b.pop("location"), "required"),
    ],
)
def test_the_fake_refuses_a_body_the_generated_models_do_not_allow(
    arm_fake: ARMFake, mutate: Any, message: str
) -> None:
    """The fake's schema is azure-mgmt-compute's generated model of the OpenAPI spec: a wrong field is a 400."""
    import requests

    from spotsafe.cloud.azure.launch.up import scale_set_body

    body = scale_set_body(_spec())
    mutate(body)
    url = f"{arm_fake.endpoint}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/x"
    r = requests.put(url, params={"api-version": "2024-07-01"}, json=body, verify=str(arm_fake.ca))
    assert r.status_code == 400 and message in r.json()["error"]["message"], f"{r.text}"
    assert arm_fake.scale_sets == {} and len(arm_fake.violations) == 1


def test_cli_price_on_azure_reads_the_retail_prices_api_page_by_page(
    retail_prices_fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.cli.main import main

    size = "Standard_NC4as_T4_v3"
    retail_prices_fake.add(size, "eastus", 0.1578)
    retail_prices_fake.add(size, "eastus", 0.2093, product="Windows")
    retail_prices_fake.add(size, "eastus", 0.526, meter="")
    retail_prices_fake.add(size, "eastus", 0.1052, meter="Low Priority")
    retail_prices_fake.add(size, "westus2", 0.1201)
    retail_prices_fake.add("Standard_NC8as_T4_v3", "westus2", 0.2254)
    monkeypatch.setenv("SPOTSAFE_AZURE_PRICES_ENDPOINT", retail_prices_fake.endpoint)
    assert main(["price", "--cloud", "azure", "--instance-types", size]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REGION", "TYPE", "USD/H", "SINCE", "DETAIL"]
    assert [tuple(line.split()[:3]) for line in lines[1:]] == [
        ("westus2", size, "0.1201"),
        ("eastus", size, "0.1578"),
    ]
    (first, *rest) = retail_prices_fake.calls("GET", r"/api/retail/prices")
    assert "contains(meterName, 'Spot')" in first[2]["$filter"] and "priceType eq 'Consumption'" in first[2]["$filter"]
    assert len(rest) == 1 and rest[0][2]["$skip"] == "2"  # the Windows Spot meter sat on page 2, left out
    assert retail_prices_fake.violations == []
    assert main(["price", "--cloud", "azure", "--instance-types", size, "--region", "eastus"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["eastus"]
    assert main(["price", "--cloud", "azure", "--instance-types", "Standard_D2s_v5"]) == 1
    assert "no Spot price for Standard_D2s_v5" in capsys.readouterr().out


def test_a_new_identity_not_yet_replicated_is_waited_for(
    arm_fake: ARMFake, arm: Arm, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.cloud.azure.launch import identity

    slept: list[float] = []
    monkeypatch.setattr(identity, "pause", slept.append)
    arm_fake.principal_lag = 2
    launch(_spec(), arm, apply=True, on_step=_quiet)
    assert len(arm_fake.role_assignments) == 2 and slept == [10.0, 10.0]


def test_status_shows_the_scale_set_its_vm_and_the_runs_progress_from_the_az_store(
    arm_fake: ARMFake, arm: Arm, az_container: str
) -> None:
    import io

    import torch

    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.cloud.azure.launch.up import format_status, status

    spec = _spec(store=f"az://{az_container}/runs/mnist")
    arm_fake.add_storage_account(SUB, RG, "spotsafeckpt")
    launch(spec, arm, apply=True, on_step=_quiet)
    ckpt = Checkpointer(spec.store)
    try:
        for step in (100, 200):
            ckpt.save(step, {"w": torch.full((4,), float(step))})
            ckpt.wait()
    finally:
        ckpt.close()
    st = status("mnist", arm, read_store=True)
    assert st.capacity == 1 and len(st.vms) == 1 and st.eviction == "Delete"
    assert st.checkpoints == 2 and st.newest.step == 200
    out = io.StringIO()
    format_status("mnist", st, out)
    text = out.getvalue()
    assert "scale set spotsafe-mnist: capacity 1, Spot, eviction Delete" in text
    assert "VM spotsafe-mnist_" in text and "newest checkpoint: step 200" in text
    # The run completes: the VM scales the set to 0 (spotsafe.cloud.azure.finish's PATCH); status says so.
    from azure.mgmt.compute.models import Sku, VirtualMachineScaleSetUpdate

    arm.client.virtual_machine_scale_sets.begin_update(
        RG, "spotsafe-mnist", VirtualMachineScaleSetUpdate(sku=Sku(capacity=0))
    ).result()
    st = status("mnist", arm)
    assert st.capacity == 0 and st.vms == {}
    assert arm_fake.violations == []


def test_the_cli_launches_shows_and_takes_down_an_azure_data_disk_run(
    arm_fake: ARMFake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``spotsafe launch/status/down --cloud azure`` end to end; only the user's credential is stood in for."""
    import azure.identity

    from spotsafe.cli.main import main

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", _Token)
    monkeypatch.setenv("SPOTSAFE_AZURE_ARM_ENDPOINT", arm_fake.endpoint)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(arm_fake.ca))
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUB)
    where = ["--cloud", "azure", "--resource-group", RG]
    spec = _spec()
    args = ["launch", "mnist", *where, "--location", "eastus", "--vm-size", spec.vm_size, "--azure-image", spec.image]
    args += ["--subnet-id", SUBNET, "--ssh-public-key", spec.ssh_public_key, "--volume-size", "64"]
    args += ["--command", "python train.py", "--yes"]
    assert main(args) == 0
    assert "eviction Deallocate, a 64 GiB data disk" in capsys.readouterr().out
    assert main(["status", "mnist", *where]) == 0
    out = capsys.readouterr().out
    assert "scale set spotsafe-mnist: capacity 1, Spot, eviction Deallocate" in out and "VM spotsafe-mnist_" in out
    assert "store /mnt/spotsafe/mnist" in out and "on the run's data disk" in out
    assert main(["down", "mnist", *where, "--yes", "--delete-store"]) == 0
    assert arm_fake.scale_sets == {} and arm_fake.role_assignments == {} and arm_fake.disks == {}
    assert arm_fake.violations == []


def test_custom_data_over_azures_64_kib_is_refused_before_any_call(arm_fake: ARMFake, arm: Arm) -> None:
    spec = _spec(command="python train.py " + "--flag " * 4000)  # 28 KB of command beside the 40 KB script
    with pytest.raises(LaunchConfigError, match=r"custom data of mnist is \d+ bytes, over Azure's 65536"):
        launch(spec, arm, apply=True, on_step=_quiet)
    assert arm_fake.scale_sets == {} and arm_fake.role_assignments == {}
    assert len(custom_data(_spec()).encode()) <= CUSTOM_DATA_LIMIT  # the usual run fits, with room
