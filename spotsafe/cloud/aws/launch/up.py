"""A self-replacing spot trainer on AWS in one command, and nothing left behind.

``spotsafe launch NAME ...`` creates, each tagged ``spotsafe-run=NAME``:

1. an IAM role ``spotsafe-NAME`` with one inline policy: the store's prefix on S3 (or,
   in volume mode, attaching the run's EBS volume) and scaling its own group to zero
   when the run is complete; nothing else (:func:`~spotsafe.cloud.aws.launch.spec.instance_policy`);
2. an instance profile ``spotsafe-NAME`` holding that role;
3. in volume mode (``--volume-size``): the run's EBS volume, in the cheapest zone of
   the given subnets (tagged ``spotsafe-new=true`` so that the first boot formats it);
4. a launch template ``spotsafe-NAME``: the image, the profile, IMDSv2 required, and the
   user data (:func:`~spotsafe.cloud.aws.launch.userdata.user_data`: the run's settings, then ``userdata/spot-boot.sh``
   unchanged), the code pinned to one commit;
5. an Auto Scaling group ``spotsafe-NAME`` of exactly one spot instance over the given
   instance types and subnets (mixed-instances policy, price-capacity-optimized,
   capacity rebalancing on).

Every step looks first and creates only what is missing, so a second call changes
nothing and an interrupted call is completed by the next one. Without ``--yes`` the
plan is printed and nothing changes.

``spotsafe status NAME``, ``spotsafe down NAME [--yes] [--delete-store]`` and
``spotsafe price --instance-types ...`` complete the set. The design (zones, the
policy, the Terraform equivalent) is in docs/launch.md.

This module is the reconciler (:func:`launch`); the run's description and policies are
in :mod:`~spotsafe.cloud.aws.launch.spec`, the user data in
:mod:`~spotsafe.cloud.aws.launch.userdata`, the other commands in
:mod:`~spotsafe.cloud.aws.launch.status`, :mod:`~spotsafe.cloud.aws.launch.down` and
:mod:`~spotsafe.cloud.aws.launch.cli`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spotsafe.cloud.aws.clients import (
    TAG,
    Clients,
    aws_call,
    error_code,
    is_aws_error,
    is_ours,
    not_ours,
    run_tags,
)
from spotsafe.cloud.aws.launch.resources import find_group, find_template, run_volumes
from spotsafe.cloud.aws.launch.spec import EC2_TRUST, POLICY_NAME, TAG_NEW, LaunchSpec, instance_policy
from spotsafe.cloud.aws.launch.userdata import (
    COMMIT_RE,
    NO_VOLUME_SETTING,
    boot_script,
    decode_user_data,
    encode_user_data,
    resolve_ref,
    settings_from_user_data,
    user_data,
)
from spotsafe.cloud.aws.prices import spot_prices, usd, zone_prices
from spotsafe.cloud.plan import Result, Step, Verb
from spotsafe.errors import LaunchConfigError, LaunchError

_ALLOCATION = "price-capacity-optimized"


@dataclass
class Subnet:
    subnet_id: str
    zone: str
    price: float | None = None


@dataclass
class LaunchResult(Result):
    """What :func:`launch` planned or did; ``applied`` False for a plan only."""

    region: str = ""
    subnets: list[Subnet] = field(default_factory=list)
    volume_id: str | None = None
    ref: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)


class _Launch:
    def __init__(
        self,
        spec: LaunchSpec,
        aws: Clients,
        *,
        apply: bool,
        script: str | None,
        wait: float,
        on_step: Callable[[Step], None] | None,
    ) -> None:
        self.on_step = on_step
        self.spec = spec
        self.aws = aws
        self.apply = apply
        self.script = boot_script() if script is None else script
        self.wait = wait
        self.result = LaunchResult(applied=apply, region=aws.region)
        self.name = spec.resource_name

    def step(self, verb: Verb, kind: str, name: str, detail: str = "") -> None:
        # Announced before it is done: an interrupted launch shows where it stopped.
        self.result.steps.append(Step(verb, kind, name, detail))
        if self.on_step is not None:
            self.on_step(self.result.steps[-1])

    # ---- the pieces, in dependency order

    def run(self) -> LaunchResult:
        spec = self.spec
        if not spec.volume_mode and f"{NO_VOLUME_SETTING}:=" not in self.script:
            raise LaunchError(
                "S3 mode needs a boot script that can run without a volume "
                f"({NO_VOLUME_SETTING}=0), and userdata/spot-boot.sh has no such setting yet: "
                "use volume mode (--volume-size GiB with --store under /mnt/spotsafe) for now"
            )
        subnets = self.subnets()
        self.role()
        self.instance_profile()
        if spec.volume_mode:
            zone = self.volume(subnets)
            subnets = [s for s in subnets if s.zone == zone]
            if not subnets:
                raise LaunchError(
                    f"the run's volume {self.result.volume_id} is in {zone} and none of the subnets is: "
                    f"pass --subnets with one in {zone} (the group stays in the volume's zone)"
                )
        self.result.subnets = subnets
        self.launch_template()
        self.group(subnets)
        return self.result

    def subnets(self) -> list[Subnet]:
        ec2 = self.aws.ec2
        if self.spec.subnets:
            r = aws_call("DescribeSubnets", ec2.describe_subnets, SubnetIds=list(self.spec.subnets))
        else:
            r = aws_call(
                "DescribeSubnets (the default VPC's)",
                ec2.describe_subnets,
                Filters=[{"Name": "default-for-az", "Values": ["true"]}],
            )
        subnets = [Subnet(s["SubnetId"], s["AvailabilityZone"]) for s in r.get("Subnets", [])]
        if not subnets:
            raise LaunchConfigError(
                "no subnets: pass --subnets (this region has no default VPC subnets)"
                if not self.spec.subnets
                else f"--subnets {','.join(self.spec.subnets)}: none found in {self.aws.region}"
            )
        by_zone = zone_prices(spot_prices(ec2, self.spec.instance_types))
        for s in subnets:
            s.price = by_zone.get(s.zone)
        # Cheapest zone first: the volume goes there, and the plan reads in that order.
        subnets.sort(key=lambda s: (s.price is None, s.price or 0.0, s.zone, s.subnet_id))
        return subnets

    def role(self) -> None:
        iam = self.aws.iam
        policy = instance_policy(self.spec)
        self.result.policy = policy
        doc = json.dumps(policy, indent=2, sort_keys=True)
        try:
            role = iam.get_role(RoleName=self.name)["Role"]
            exists = True
        except Exception as e:
            if error_code(e) != "NoSuchEntity":
                raise LaunchError(f"GetRole {self.name}: {e}") from e
            exists = False
        if exists and not is_ours(role.get("Tags", []), self.spec.name):
            # Launch tags what it creates as it creates it: an untagged one is somebody else's.
            raise not_ours("IAM role", self.name, self.spec.name)
        if not exists:
            self.step("create", "iam role", self.name, "trusted by ec2.amazonaws.com")
            if self.apply:
                aws_call(
                    f"CreateRole {self.name}",
                    iam.create_role,
                    RoleName=self.name,
                    AssumeRolePolicyDocument=json.dumps(EC2_TRUST),
                    Description=f"spotsafe run {self.spec.name}: its instances",
                    Tags=run_tags(self.spec.name),
                )
        else:
            self.step("keep", "iam role", self.name)
        current = None
        if exists:
            try:
                got = iam.get_role_policy(RoleName=self.name, PolicyName=POLICY_NAME)["PolicyDocument"]
                current = json.loads(got) if isinstance(got, str) else got
            except Exception as e:
                if error_code(e) != "NoSuchEntity":
                    raise LaunchError(f"GetRolePolicy {self.name}: {e}") from e
        if current == json.loads(doc):
            self.step("keep", "iam policy", f"{self.name}/{POLICY_NAME}")
            return
        self.step(
            "create" if current is None else "update",
            "iam policy",
            f"{self.name}/{POLICY_NAME}",
            ", ".join(sorted({a for st in policy["Statement"] for a in st["Action"]})),
        )
        if self.apply:
            aws_call(
                f"PutRolePolicy {self.name}",
                iam.put_role_policy,
                RoleName=self.name,
                PolicyName=POLICY_NAME,
                PolicyDocument=doc,
            )

    def instance_profile(self) -> None:
        iam = self.aws.iam
        try:
            profile = iam.get_instance_profile(InstanceProfileName=self.name)["InstanceProfile"]
        except Exception as e:
            if error_code(e) != "NoSuchEntity":
                raise LaunchError(f"GetInstanceProfile {self.name}: {e}") from e
            profile = None
        if profile is not None and not is_ours(profile.get("Tags", []), self.spec.name):
            raise not_ours("instance profile", self.name, self.spec.name)
        if profile is None:
            self.step("create", "instance profile", self.name)
            if self.apply:
                aws_call(
                    f"CreateInstanceProfile {self.name}",
                    iam.create_instance_profile,
                    InstanceProfileName=self.name,
                    Tags=run_tags(self.spec.name),
                )
            roles: list[str] = []
        else:
            self.step("keep", "instance profile", self.name)
            roles = [r["RoleName"] for r in profile.get("Roles", [])]
        if self.name not in roles:
            self.step("create", "instance profile role", f"{self.name} <- role {self.name}")
            if self.apply:
                aws_call(
                    f"AddRoleToInstanceProfile {self.name}",
                    iam.add_role_to_instance_profile,
                    InstanceProfileName=self.name,
                    RoleName=self.name,
                )

    def volume(self, subnets: list[Subnet]) -> str:
        ec2 = self.aws.ec2
        vols = run_volumes(ec2, self.spec.name)
        if len(vols) > 1:
            raise LaunchError(
                f"{len(vols)} volumes are tagged {TAG}={self.spec.name} "
                f"({', '.join(v['VolumeId'] for v in vols)}): keep one (the one with the checkpoints)"
            )
        if vols:
            v = vols[0]
            self.result.volume_id = v["VolumeId"]
            self.step("keep", "ebs volume", v["VolumeId"], f"{v['Size']} GiB in {v['AvailabilityZone']}")
            if v["Size"] != self.spec.volume_size:
                self.step(
                    "note", "ebs volume", v["VolumeId"], f"is {v['Size']} GiB, not {self.spec.volume_size}: left as is"
                )
            return str(v["AvailabilityZone"])
        zone = subnets[0].zone
        price = f", spot from {usd(subnets[0].price)}/h there" if subnets[0].price is not None else ""
        self.step(
            "create", "ebs volume", f"{TAG}={self.spec.name}", f"{self.spec.volume_size} GiB gp3 in {zone}{price}"
        )
        if self.apply:
            r = aws_call(
                "CreateVolume",
                ec2.create_volume,
                AvailabilityZone=zone,
                Size=self.spec.volume_size,
                VolumeType="gp3",
                Encrypted=True,
                TagSpecifications=[
                    {
                        "ResourceType": "volume",
                        "Tags": [*run_tags(self.spec.name), {"Key": TAG_NEW, "Value": "true"}],
                    }
                ],
            )
            self.result.volume_id = r["VolumeId"]
        return zone

    def template_data(self, ref: str | None) -> dict[str, Any]:
        text = user_data(
            self.spec,
            region=self.aws.region,
            volume_id=self.result.volume_id or "(the volume created above)",
            ref=ref,
            script=self.script,
        )
        data: dict[str, Any] = {
            "ImageId": self.spec.image_id,
            "IamInstanceProfile": {"Name": self.name},
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                # 2: a container on the instance can still reach IMDS (notices, identity).
                "HttpPutResponseHopLimit": 2,
            },
            "UserData": encode_user_data(text),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": run_tags(self.spec.name)}],
            # The boot script's shutdown (run complete, failed boot) ends the instance, not pauses it.
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if self.spec.security_groups:
            data["SecurityGroupIds"] = list(self.spec.security_groups)
        if self.spec.key_name:
            data["KeyName"] = self.spec.key_name
        return data

    def launch_template(self) -> None:
        ec2 = self.aws.ec2
        lt = find_template(ec2, self.name)
        if lt is not None and not is_ours(lt.get("Tags", []), self.spec.name):
            raise not_ours("launch template", self.name, self.spec.name)
        current = _template_data(ec2, self.name)
        ref = None
        if self.spec.repo:
            ref = self.spec.ref if self.spec.ref and COMMIT_RE.fullmatch(self.spec.ref) else None
            if ref is None and current is not None:
                old = settings_from_user_data(_decode(current.get("UserData", "")))
                if old.get("SPOTSAFE_REPO") == self.spec.repo and COMMIT_RE.fullmatch(old.get("SPOTSAFE_REF", "")):
                    # A branch is pinned once, at the first launch: a rerun never changes the code mid-run.
                    ref = old["SPOTSAFE_REF"]
                    self.step("note", "code", self.spec.repo, f"stays at {ref} (pass --ref COMMIT to change it)")
            if ref is None:
                ref = resolve_ref(self.spec.repo, self.spec.ref)
                self.step("note", "code", self.spec.repo, f"--ref {self.spec.ref or 'HEAD'} pinned at {ref}")
        self.result.ref = ref
        want = self.template_data(ref)
        if current is None:
            self.step(
                "create",
                "launch template",
                self.name,
                f"{self.spec.image_id}, IMDSv2 required, user data: store {self.spec.store}, command {self.spec.command!r}",
            )
            if self.apply:
                aws_call(
                    f"CreateLaunchTemplate {self.name}",
                    self.aws.ec2.create_launch_template,
                    LaunchTemplateName=self.name,
                    VersionDescription=f"spotsafe launch {self.spec.name}",
                    LaunchTemplateData=want,
                    TagSpecifications=[
                        {"ResourceType": "launch-template", "Tags": run_tags(self.spec.name, self.spec.store)}
                    ],
                )
            return
        have = dict(current)
        # Only instance tags belong in the data (moto echoes the template's own tags there too).
        have["TagSpecifications"] = [
            t for t in have.get("TagSpecifications", []) if t.get("ResourceType") != "launch-template"
        ] or None
        changed = sorted(k for k in set(want) | set(have) if _norm(want.get(k)) != _norm(have.get(k)))
        if not changed:
            self.step("keep", "launch template", self.name)
            return
        self.step("update", "launch template", self.name, f"new default version: {', '.join(changed)} changed")
        if self.apply:
            v = aws_call(
                f"CreateLaunchTemplateVersion {self.name}",
                ec2.create_launch_template_version,
                LaunchTemplateName=self.name,
                VersionDescription=f"spotsafe launch {self.spec.name}",
                LaunchTemplateData=want,
            )["LaunchTemplateVersion"]["VersionNumber"]
            aws_call(
                f"ModifyLaunchTemplate {self.name}",
                ec2.modify_launch_template,
                LaunchTemplateName=self.name,
                DefaultVersion=str(v),
            )

    def group_settings(self, subnets: list[Subnet]) -> dict[str, Any]:
        return {
            "VPCZoneIdentifier": ",".join(s.subnet_id for s in subnets),
            "MixedInstancesPolicy": {
                "LaunchTemplate": {
                    "LaunchTemplateSpecification": {"LaunchTemplateName": self.name, "Version": "$Default"},
                    "Overrides": [{"InstanceType": t} for t in self.spec.instance_types],
                },
                "InstancesDistribution": {
                    "OnDemandBaseCapacity": 0,
                    "OnDemandPercentageAboveBaseCapacity": 0,
                    "SpotAllocationStrategy": _ALLOCATION,
                },
            },
            "CapacityRebalance": True,
        }

    def group(self, subnets: list[Subnet]) -> None:
        asg = self.aws.autoscaling
        want = self.group_settings(subnets)
        g = find_group(asg, self.name)
        zones = ", ".join(f"{s.subnet_id} ({s.zone}{'' if s.price is None else f' {usd(s.price)}/h'})" for s in subnets)
        if g is None:
            self.step(
                "create",
                "auto scaling group",
                self.name,
                f"1 spot instance of {','.join(self.spec.instance_types)}, {_ALLOCATION}, "
                f"capacity rebalancing, subnets {zones}",
            )
            if self.apply:
                self._create_group(want)
            return
        if not is_ours(g.get("Tags", []), self.spec.name):
            raise not_ours("Auto Scaling group", self.name, self.spec.name)
        have = _group_settings(g)
        changed = sorted(k for k in want if _norm(want[k]) != _norm(have.get(k)))
        if g.get("DesiredCapacity") == 0:
            self.step(
                "note", "auto scaling group", self.name, "scaled to 0 (the run finished?): `spotsafe down` removes it"
            )
        if not changed:
            self.step("keep", "auto scaling group", self.name)
            return
        self.step("update", "auto scaling group", self.name, f"{', '.join(changed)} changed")
        if self.apply:
            aws_call(
                f"UpdateAutoScalingGroup {self.name}",
                asg.update_auto_scaling_group,
                AutoScalingGroupName=self.name,
                **want,
            )

    def _create_group(self, want: dict[str, Any]) -> None:
        tags = [
            {
                "Key": t["Key"],
                "Value": t["Value"],
                "PropagateAtLaunch": t["Key"] == TAG,
                "ResourceId": self.name,
                "ResourceType": "auto-scaling-group",
            }
            for t in [*run_tags(self.spec.name, self.spec.store), {"Key": "Name", "Value": self.name}]
        ]
        tags[-1]["PropagateAtLaunch"] = True
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self.aws.autoscaling.create_auto_scaling_group(
                    AutoScalingGroupName=self.name,
                    MinSize=1,
                    DesiredCapacity=1,
                    # One instance trains; the second place lets capacity rebalancing start the
                    # replacement before it terminates the instance at risk (docs/launch.md).
                    MaxSize=2,
                    Tags=tags,
                    **want,
                )
                return
            except Exception as e:
                # IAM is eventually consistent: a profile made seconds ago may not be usable yet.
                fresh = error_code(e) == "ValidationError" and "profile" in str(e).lower()
                if not fresh or time.monotonic() >= deadline:
                    if is_aws_error(e):
                        raise LaunchError(f"CreateAutoScalingGroup {self.name}: {e}") from e
                    raise
                time.sleep(5)


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str)) if value is not None else None


def _decode(b64: str) -> str:
    try:
        return decode_user_data(b64)
    except (ValueError, OSError, EOFError):
        return ""


def _template_data(ec2: Any, name: str) -> dict[str, Any] | None:
    if find_template(ec2, name) is None:
        return None
    r = aws_call(
        f"DescribeLaunchTemplateVersions {name}",
        ec2.describe_launch_template_versions,
        LaunchTemplateName=name,
        Versions=["$Default"],
    )
    versions = r.get("LaunchTemplateVersions", [])
    return dict(versions[0]["LaunchTemplateData"]) if versions else {}


def _group_settings(g: dict[str, Any]) -> dict[str, Any]:
    mip = g.get("MixedInstancesPolicy", {})
    lt = mip.get("LaunchTemplate", {})
    spec = lt.get("LaunchTemplateSpecification", {})
    dist = mip.get("InstancesDistribution", {})
    return {
        "VPCZoneIdentifier": g.get("VPCZoneIdentifier", ""),
        "MixedInstancesPolicy": {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateName": spec.get("LaunchTemplateName"),
                    "Version": spec.get("Version"),
                },
                "Overrides": [{"InstanceType": o.get("InstanceType")} for o in lt.get("Overrides", [])],
            },
            "InstancesDistribution": {
                "OnDemandBaseCapacity": dist.get("OnDemandBaseCapacity"),
                "OnDemandPercentageAboveBaseCapacity": dist.get("OnDemandPercentageAboveBaseCapacity"),
                "SpotAllocationStrategy": dist.get("SpotAllocationStrategy"),
            },
        },
        "CapacityRebalance": bool(g.get("CapacityRebalance")),
    }


def launch(
    spec: LaunchSpec,
    aws: Clients | None = None,
    *,
    apply: bool = False,
    script: str | None = None,
    profile_wait: float = 120.0,
    on_step: Callable[[Step], None] | None = None,
) -> LaunchResult:
    """Plan (``apply=False``: describes only) or create the run's resources; idempotent.

    ``script``: the boot script's text (default: ``userdata/spot-boot.sh``).
    ``profile_wait``: how long a fresh instance profile may take to become usable.
    ``on_step``: called with each step as it is decided, before it is carried out.
    """
    spec.validate()
    aws = aws or Clients(spec.region)
    return _Launch(spec, aws, apply=apply, script=script, wait=profile_wait, on_step=on_step).run()
