"""spotsafe's GCP launcher (spotsafe.cloud.gcp.launch) against tests/gcefake.py, a local Compute Engine REST fake.

google-cloud-compute talks to the fake as to compute.googleapis.com (its REST transport, an
``api_endpoint`` with the scheme); every request body is checked against the documented
schema there (tests/gcefake.py says where each fact comes from). Not run against GCP itself.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from spotsafe.cloud.gcp.launch.spec import GcpLaunchSpec, startup_script
from spotsafe.cloud.gcp.launch.up import Compute, down, launch, status
from spotsafe.errors import LaunchConfigError, LaunchError
from tests.gcefake import ComputeFake

PROJECT, ZONE = "spotsafe-test", "us-central1-a"


def _spec(**overrides: Any) -> GcpLaunchSpec:
    base: dict[str, Any] = {
        "name": "mnist",
        "project": PROJECT,
        "zone": ZONE,
        "machine_type": "g2-standard-4",
        "image": "projects/deeplearning-platform-release/global/images/family/common-cu124",
        "command": "python train.py",
        "store": "/mnt/spotsafe/mnist",
        "disk_size": 100,
        "pip_spec": "git+https://example.invalid/spotsafe.git@" + "0" * 40,
    }
    base.update(overrides)
    return GcpLaunchSpec(**base)


@pytest.fixture
def gce(compute_fake: ComputeFake) -> Compute:
    from google.auth.credentials import AnonymousCredentials

    compute_fake.iam.add_project(PROJECT)
    return Compute(PROJECT, ZONE, credentials=AnonymousCredentials(), endpoint=compute_fake.endpoint)  # type: ignore[no-untyped-call]


def _quiet(_: Any) -> None:
    pass


def test_plan_changes_nothing_then_launch_creates_a_spot_group_with_a_stateful_disk(
    compute_fake: ComputeFake, gce: Compute
) -> None:
    plan = launch(_spec(), gce, apply=False, on_step=_quiet)
    assert [(s.verb, s.kind) for s in plan.steps] == [
        ("create", "service account"),
        ("create", "custom role"),
        ("create", "binding on project"),
        ("create", "instance template"),
        ("create", "managed instance group"),
    ]
    assert compute_fake.calls("POST", r".*Templates|.*Managers|.*Accounts|.*roles|.*:setIamPolicy") == []
    done = launch(_spec(), gce, apply=True, on_step=_quiet)
    assert len(done.changes) == 5
    assert compute_fake.violations == []
    (tmpl,) = compute_fake.templates.values()
    props = tmpl["properties"]
    assert props["scheduling"]["provisioningModel"] == "SPOT"
    assert props["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert props["labels"] == {"spotsafe-run": "mnist"}
    data = [d for d in props["disks"] if not d["boot"]]
    assert data[0]["deviceName"] == "spotsafe-mnist" and data[0]["autoDelete"] is False
    items = {i["key"]: i["value"] for i in props["metadata"]["items"]}
    assert items["startup-script"] == startup_script(_spec())
    assert "SPOTSAFE_DISK_NAME=spotsafe-mnist" in items["startup-script"]
    assert "spotsafe-boot stop" in items["shutdown-script"]
    group = compute_fake.groups[(PROJECT, ZONE, "spotsafe-mnist")]
    assert group["targetSize"] == 1
    assert group["statefulPolicy"] == {"preservedState": {"disks": {"spotsafe-mnist": {"autoDelete": "NEVER"}}}}
    assert group["instanceTemplate"].endswith("/global/instanceTemplates/spotsafe-mnist")
    # Again: nothing to change.
    posts = len(compute_fake.calls("POST", r".*"))
    again = launch(_spec(), gce, apply=True, on_step=_quiet)
    # Again: nothing changes; the only POST is the (read-only) getIamPolicy.
    assert again.changes == [] and [c[1] for c in compute_fake.calls("POST", r".*")[posts:]] == [
        f"/v1/projects/{PROJECT}:getIamPolicy"
    ]


#: Every creating call of a launch, as (method, the end of its route's pattern).
CREATING_CALLS = [
    ("POST", "/serviceAccounts"),
    ("POST", "/roles"),
    ("POST", ":setIamPolicy"),
    ("PUT", "/iam"),
    ("POST", "/global/instanceTemplates"),
    ("POST", "/instanceGroupManagers"),
]


def _route_key(fake: ComputeFake, method: str, tail: str) -> str:
    (key,) = [f"{m} {rx.pattern}" for m, rx, _ in fake.routes if m == method and rx.pattern.endswith(tail)]
    return key


@pytest.mark.parametrize(("method", "tail"), CREATING_CALLS)
def test_a_launch_cut_after_each_creating_call_is_completed_by_the_next(
    compute_fake: ComputeFake, gce: Compute, method: str, tail: str
) -> None:
    """The call did its work but its answer was lost (the operator's machine died): rerun, nothing doubled."""
    compute_fake.iam.add_bucket("ckpt")
    spec = _spec(disk_size=None, store="gs://ckpt/runs/mnist")
    compute_fake.crash_after[_route_key(compute_fake, method, tail)] = 1
    with pytest.raises(LaunchError):
        launch(spec, gce, apply=True, on_step=_quiet)
    launch(spec, gce, apply=True, on_step=_quiet)
    assert len(compute_fake.templates) == 1 and len(compute_fake.groups) == 1
    assert len(compute_fake.iam.accounts) == 1 and len(compute_fake.iam.roles) == 1
    assert len(compute_fake.iam.bindings(f"projects/{PROJECT}")) == 1
    assert len(compute_fake.iam.bindings("b/ckpt")) == 2  # the owner's and the run's
    assert compute_fake.violations == []
    assert launch(spec, gce, apply=True, on_step=_quiet).changes == []


def test_launch_gives_the_vm_its_own_least_privilege_identity_and_down_removes_it(
    compute_fake: ComputeFake, gce: Compute
) -> None:
    compute_fake.iam.add_bucket("ckpt")
    spec = _spec(disk_size=None, store="gs://ckpt/runs/mnist")
    plan = launch(spec, gce, apply=False, on_step=_quiet)
    assert [(s.verb, s.kind) for s in plan.steps][:4] == [
        ("create", "service account"),
        ("create", "custom role"),
        ("create", "binding on project"),
        ("create", "binding on bucket ckpt"),
    ]
    assert compute_fake.iam.accounts == {} and compute_fake.iam.roles == {}
    launch(spec, gce, apply=True, on_step=_quiet)
    email = f"spotsafe-mnist@{PROJECT}.iam.gserviceaccount.com"
    assert list(compute_fake.iam.accounts) == [email]
    role = compute_fake.iam.roles[(PROJECT, "spotsafe_mnist")]
    assert role["includedPermissions"] == ["compute.instanceGroupManagers.get", "compute.instanceGroupManagers.update"]
    (binding,) = compute_fake.iam.bindings(f"projects/{PROJECT}")
    assert binding["role"] == f"projects/{PROJECT}/roles/spotsafe_mnist"
    assert binding["members"] == [f"serviceAccount:{email}"]
    group = f"projects/{PROJECT}/zones/{ZONE}/instanceGroupManagers/spotsafe-mnist"
    assert binding["condition"]["expression"] == f'resource.name == "{group}"'
    store = compute_fake.iam.bindings("b/ckpt")[-1]
    assert store["role"] == "roles/storage.objectUser" and store["members"] == [f"serviceAccount:{email}"]
    assert 'resource.name.startsWith("projects/_/buckets/ckpt/objects/runs/mnist/")' in store["condition"]["expression"]
    (tmpl,) = compute_fake.templates.values()
    assert tmpl["properties"]["serviceAccounts"][0]["email"] == email
    # down: the bindings, the role and the account go (the bucket's owner binding stays).
    _, left = down("mnist", gce, apply=True, delete_store=False, on_step=_quiet)
    assert left == [] and compute_fake.iam.accounts == {}
    assert compute_fake.iam.roles[(PROJECT, "spotsafe_mnist")]["deleted"] is True
    assert compute_fake.iam.bindings(f"projects/{PROJECT}") == []
    assert [b["role"] for b in compute_fake.iam.bindings("b/ckpt")] == ["roles/storage.legacyBucketOwner"]
    # A relaunch of the name: the deleted role (its id kept 7 days) is undeleted, not recreated.
    steps = launch(spec, gce, apply=True, on_step=_quiet).steps
    assert ("create", "custom role", "undelete (down deleted it)") in [(s.verb, s.kind, s.detail) for s in steps]
    assert "deleted" not in compute_fake.iam.roles[(PROJECT, "spotsafe_mnist")]
    assert compute_fake.violations == []


def test_a_given_service_account_means_no_iam_is_created(compute_fake: ComputeFake, gce: Compute) -> None:
    launch(_spec(service_account="mine@p.iam.gserviceaccount.com"), gce, apply=True, on_step=_quiet)
    assert compute_fake.iam.accounts == {} and compute_fake.iam.roles == {}
    (tmpl,) = compute_fake.templates.values()
    assert tmpl["properties"]["serviceAccounts"][0]["email"] == "mine@p.iam.gserviceaccount.com"
    _, left = down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    assert left == [] and compute_fake.calls("POST", r".*IamPolicy") == []  # no IAM of the run's to read


@pytest.mark.parametrize(
    ("method", "tail"), [("POST", ":setIamPolicy"), ("PUT", "/iam"), ("DELETE", "/roles/(?P<role>[^/:]+)")]
)
def test_a_down_cut_while_removing_the_identity_is_completed_by_the_next(
    compute_fake: ComputeFake, gce: Compute, method: str, tail: str
) -> None:
    compute_fake.iam.add_bucket("ckpt")
    spec = _spec(disk_size=None, store="gs://ckpt/runs/mnist")
    launch(spec, gce, apply=True, on_step=_quiet)
    compute_fake.crash_after[_route_key(compute_fake, method, tail)] = 1
    with pytest.raises(LaunchError):
        down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    _, left = down("mnist", gce, apply=True, delete_store=True, store=spec.store, on_step=_quiet)
    assert left == [] and compute_fake.iam.accounts == {} and compute_fake.templates == {}
    assert compute_fake.iam.bindings(f"projects/{PROJECT}") == [] and len(compute_fake.iam.bindings("b/ckpt")) == 1


def test_a_service_account_spotsafe_did_not_make_is_refused(compute_fake: ComputeFake, gce: Compute) -> None:
    email = f"spotsafe-mnist@{PROJECT}.iam.gserviceaccount.com"
    compute_fake.iam.accounts[email] = {"email": email, "description": "the data team's"}
    with pytest.raises(LaunchError, match="spotsafe did not create"):
        launch(_spec(), gce, apply=True, on_step=_quiet)
    down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    assert email in compute_fake.iam.accounts


def test_a_changed_launch_is_refused_not_half_applied(compute_fake: ComputeFake, gce: Compute) -> None:
    launch(_spec(), gce, apply=True, on_step=_quiet)
    with pytest.raises(LaunchError, match="differs from this launch"):
        launch(_spec(command="python other.py"), gce, apply=True, on_step=_quiet)


def test_down_leaves_nothing_labelled(compute_fake: ComputeFake, gce: Compute) -> None:
    launch(_spec(), gce, apply=True, on_step=_quiet)
    st = status("mnist", gce)
    assert st.target_size == 1 and len(st.instances) == 1 and st.disks == ["spotsafe-mnist"]
    plan, _ = down("mnist", gce, apply=False, delete_store=False, on_step=_quiet)
    assert [(s.verb, s.kind) for s in plan.steps] == [
        ("delete", "managed instance group"),
        ("delete", "binding on project"),
        ("delete", "custom role"),
        ("delete", "service account"),
        ("delete", "instance template"),
        ("keep", "disk"),
    ]
    assert compute_fake.calls("DELETE", r".*") == []
    # Without --delete-store the checkpoints' disk stays, and is said to.
    _, left = down("mnist", gce, apply=True, delete_store=False, on_step=_quiet)
    assert left == [] and list(compute_fake.disks) == [(PROJECT, ZONE, "spotsafe-mnist")]
    _, left = down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    assert left == []
    assert compute_fake.templates == {} and compute_fake.groups == {}
    assert compute_fake.instances == {} and compute_fake.disks == {}
    assert compute_fake.violations == []


def test_a_delete_cut_short_is_completed_by_the_next_down(compute_fake: ComputeFake, gce: Compute) -> None:
    launch(_spec(), gce, apply=True, on_step=_quiet)
    compute_fake.crash_after[
        next(
            f"{m} {rx.pattern}"
            for m, rx, _ in compute_fake.routes
            if m == "DELETE" and "instanceGroupManagers" in rx.pattern
        )
    ] = 1
    with pytest.raises(LaunchError):
        down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    _, left = down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    assert left == [] and compute_fake.templates == {} and compute_fake.disks == {}


def test_a_template_spotsafe_did_not_make_is_left_alone(compute_fake: ComputeFake, gce: Compute) -> None:
    compute_fake.templates[(PROJECT, "spotsafe-mnist")] = {
        "name": "spotsafe-mnist",
        "description": "someone's",
        "properties": {},
    }
    with pytest.raises(LaunchError, match="did not create"):
        launch(_spec(), gce, apply=True, on_step=_quiet)
    down("mnist", gce, apply=True, delete_store=True, on_step=_quiet)
    assert (PROJECT, "spotsafe-mnist") in compute_fake.templates


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Bad_Name"}, "run name"),
        ({"disk_size": None}, "gs://BUCKET"),
        ({"service_account": "nobody"}, "--service-account"),
    ],
)
def test_bad_input_is_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(LaunchConfigError, match=message):
        _spec(**overrides).validate()


def test_a_gs_store_has_no_disk(compute_fake: ComputeFake, gce: Compute) -> None:
    compute_fake.iam.add_bucket("bucket")
    out = io.StringIO()
    launch(_spec(disk_size=None, store="gs://bucket/runs/mnist"), gce, apply=True, on_step=lambda s: print(s, file=out))
    (tmpl,) = compute_fake.templates.values()
    assert [d["boot"] for d in tmpl["properties"]["disks"]] == [True]
    assert "statefulPolicy" not in compute_fake.groups[(PROJECT, ZONE, "spotsafe-mnist")]
    assert "SPOTSAFE_ATTACH=0" in tmpl["properties"]["metadata"]["items"][0]["value"]
    assert compute_fake.violations == []


def test_cli_azure_launch_names_what_is_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.cli.main import main

    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    args = ["launch", "r", "--cloud", "azure", "--command", "python train.py", "--store", "az://c/r"]
    assert main(args) == 2
    assert "--cloud azure needs --subscription" in capsys.readouterr().err


def test_cli_aws_still_needs_its_instance_types(capsys: pytest.CaptureFixture[str]) -> None:
    from spotsafe.cli.main import main

    assert main(["launch", "r", "--command", "python train.py", "--store", "s3://b/r", "--image-id", "ami-1"]) == 2
    assert "--instance-types is required on AWS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["properties"].update(schedulingPolicy={}), "not a field"),
        (lambda b: b["properties"]["scheduling"].update(provisioningModel="CHEAP"), "documented values"),
        (lambda b: b["properties"]["disks"][0]["initializeParams"].update(diskSizeGb="ten"), "int64"),
        (lambda b: b.pop("name"), "required"),
    ],
)
def test_the_fake_refuses_a_body_its_discovery_schema_does_not_allow(
    compute_fake: ComputeFake, mutate: Any, message: str
) -> None:
    """The fake's schema is compute.v1's discovery document: a wrong field is a 400, as from the real API."""
    import requests

    from spotsafe.cloud.gcp.launch.spec import template_body

    body = template_body(_spec())
    mutate(body)
    r = requests.post(f"{compute_fake.endpoint}/compute/v1/projects/{PROJECT}/global/instanceTemplates", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], f"{r.text}"
    assert compute_fake.templates == {} and len(compute_fake.violations) == 1


def test_cli_price_on_gcp_reads_the_billing_catalog_page_by_page(
    billing_fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.cli.main import main
    from tests.pricefake import gcp_sku

    core, ram = 0.0071, 0.00095
    billing_fake.add(
        gcp_sku("Spot Preemptible N2 Instance Core running in Americas", ["us-central1", "us-east1"], core)
    )
    billing_fake.add(gcp_sku("N2 Instance Core running in Americas", ["us-central1", "us-east1"], 0.031611))
    billing_fake.add(gcp_sku("Spot Preemptible E2 Instance Core running in Americas", ["us-central1"], 0.0066))
    billing_fake.add(gcp_sku("Spot Preemptible N2 Custom Instance Core running in Americas", ["us-central1"], 0.008))
    billing_fake.add(
        gcp_sku("Spot Preemptible N2 Instance Ram running in Americas", ["us-central1", "us-east1"], ram, unit="GiBy.h")
    )
    billing_fake.add(gcp_sku("Spot Preemptible N2 Instance Core running in Belgium", ["europe-west1"], 0.0078))
    monkeypatch.setenv("SPOTSAFE_GCP_BILLING_ENDPOINT", billing_fake.endpoint)
    args = ["price", "--cloud", "gcp", "--instance-types", "n2-standard-8", "--api-key", "test-key"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["REGION", "TYPE", "USD/H", "SINCE"]
    # europe-west1 has no Ram SKU here: not priced; the two Americas regions are, the same.
    assert [(line.split()[0], line.split()[1], line.split()[2]) for line in lines[1:]] == [
        ("us-central1", "n2-standard-8", f"{8 * core + 32 * ram:.4f}"),
        ("us-east1", "n2-standard-8", f"{8 * core + 32 * ram:.4f}"),
    ]
    pages = billing_fake.calls("GET", r".*/skus")
    assert len(pages) == 3 and all(q["key"] == "test-key" for _, _, q, _ in pages)
    assert billing_fake.violations == []
    assert main([*args[:-2], "--api-key", "test-key", "--region", "us-east1"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["us-east1"]
    assert main(["price", "--cloud", "gcp", "--instance-types", "a3-megagpu-8g", "--api-key", "k"]) == 1
    assert "no Spot price for a3-megagpu-8g" in capsys.readouterr().out


def test_cli_price_on_gcp_names_the_api_when_it_refuses(
    billing_fake: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.cloud.gcp.prices import unit_prices

    monkeypatch.setenv("SPOTSAFE_GCP_BILLING_ENDPOINT", billing_fake.endpoint)
    billing_fake.route("GET", r"/v1/services/.*", lambda r: (403, billing_fake.error(403, "API key not valid"), {}))
    billing_fake.routes.insert(0, billing_fake.routes.pop())
    with pytest.raises(LaunchError, match=r"Cloud Billing Catalog API answered 403.*API key not valid"):
        unit_prices({"n2"}, None, api_key="bad")


def _save_steps(store: str, steps: tuple[int, ...]) -> None:
    import torch

    from spotsafe.checkpoint.writer import Checkpointer

    ckpt = Checkpointer(store)
    try:
        for step in steps:
            ckpt.save(step, {"w": torch.full((4,), float(step)), "epoch": step // 100})
            ckpt.wait()
    finally:
        ckpt.close()


def test_status_shows_the_group_its_vm_and_the_runs_progress_from_the_gs_store(
    compute_fake: ComputeFake, gce: Compute, gcs_bucket: str
) -> None:
    from spotsafe.cloud.gcp.launch.up import format_status

    compute_fake.iam.add_bucket(gcs_bucket)
    spec = _spec(disk_size=None, store=f"gs://{gcs_bucket}/runs/mnist")
    launch(spec, gce, apply=True, on_step=_quiet)
    _save_steps(spec.store, (100, 200))
    st = status("mnist", gce, read_store=True)
    assert st.store == spec.store and st.checkpoints == 2 and st.newest.step == 200
    out = io.StringIO()
    format_status("mnist", st, out)
    text = out.getvalue()
    assert "managed instance group spotsafe-mnist: target size 1" in text
    assert "RUNNING" in text and f"store {spec.store}" in text
    assert "newest checkpoint: step 200" in text and "2 kept" in text
    assert "interruptions: 0" in text


def test_status_of_a_disk_run_says_where_its_checkpoints_are(compute_fake: ComputeFake, gce: Compute) -> None:
    launch(_spec(), gce, apply=True, on_step=_quiet)
    st = status("mnist", gce, read_store=True)
    assert st.store == "/mnt/spotsafe/mnist" and st.disks == ["spotsafe-mnist"]
    assert st.store_error is not None and "on the run's disk" in st.store_error


def test_the_cli_launches_shows_and_takes_down_a_gcp_run(
    compute_fake: ComputeFake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``spotsafe launch/status/down --cloud gcp`` end to end; only the user's credentials are stood in for."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    from spotsafe.cli.main import main

    compute_fake.iam.add_project(PROJECT)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), PROJECT))  # type: ignore[no-untyped-call]
    monkeypatch.setenv("SPOTSAFE_GCP_COMPUTE_ENDPOINT", compute_fake.endpoint)
    where = ["--cloud", "gcp", "--zone", ZONE]
    args = ["launch", "mnist", *where, "--machine-type", "g2-standard-4", "--image", _spec().image]
    args += ["--volume-size", "100", "--command", "python train.py"]
    assert main(args) == 0
    assert "plan only: rerun with --yes" in capsys.readouterr().out and compute_fake.templates == {}
    assert main([*args, "--yes"]) == 0
    out = capsys.readouterr().out
    assert "create  service account spotsafe-mnist@" in out and "create  managed instance group" in out
    assert main(["status", "mnist", *where]) == 0
    out = capsys.readouterr().out
    assert "managed instance group spotsafe-mnist: target size 1" in out and "RUNNING" in out
    assert "store /mnt/spotsafe/mnist" in out and "on the run's disk" in out
    assert main(["down", "mnist", *where, "--yes", "--delete-store"]) == 0
    assert "still there" not in capsys.readouterr().out
    assert compute_fake.groups == {} and compute_fake.disks == {} and compute_fake.iam.accounts == {}
    assert compute_fake.violations == []
