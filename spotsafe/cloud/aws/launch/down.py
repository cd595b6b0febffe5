"""``spotsafe down NAME``: delete what ``launch`` created, keep the store unless asked, list what is left.

Order: the group (its instances terminated), the launch template, the instance
profile, the role; then, with ``delete_store``, the volume or the store's objects.
Only what carries the run's tag is touched: a same-named resource of somebody else's
is noted and left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from spotsafe.cloud.aws.clients import TAG, Clients, aws_call, error_code, is_ours
from spotsafe.cloud.aws.launch.resources import (
    Tagged,
    find_group,
    find_template,
    run_store,
    run_volumes,
    tagged_resources,
)
from spotsafe.cloud.aws.launch.spec import PREFIX, check_name, s3_location
from spotsafe.cloud.plan import Step, Verb
from spotsafe.errors import LaunchError


@dataclass
class DownResult:
    steps: list[Step] = field(default_factory=list)
    applied: bool = False
    #: Still tagged after ``down`` (with ``applied``): the kept store volume is in ``kept``, not here.
    left: list[Tagged] = field(default_factory=list)
    kept: list[Tagged] = field(default_factory=list)
    store: str | None = None

    @property
    def changes_planned(self) -> bool:
        return any(s.verb == "delete" for s in self.steps)


def down(
    name: str,
    aws: Clients,
    *,
    apply: bool = False,
    delete_store: bool = False,
    store: str | None = None,
    timeout: float = 600.0,
    poll: float = 5.0,
    on_step: Callable[[Step], None] | None = None,
) -> DownResult:
    """Delete what :func:`~spotsafe.cloud.aws.launch.up.launch` created (plan only without ``apply``).

    In the order the module's docstring gives; the store is kept unless ``delete_store``.
    Afterwards (with ``apply``) lists what is still tagged ``spotsafe-run=NAME``.
    """
    check_name(name)
    teardown = _Teardown(name, aws, apply=apply, timeout=timeout, poll=poll, on_step=on_step)
    store = store or run_store(aws, name)
    teardown.out.store = store
    teardown.group()
    teardown.launch_template()
    teardown.instance_profile()
    teardown.role()
    teardown.store(store, delete_store=delete_store)
    if apply:
        teardown.leftovers(delete_store=delete_store)
    return teardown.out


class _Teardown:
    """One ``down``: each step announced (and kept in :attr:`out`) before it is carried out."""

    def __init__(
        self,
        name: str,
        aws: Clients,
        *,
        apply: bool,
        timeout: float,
        poll: float,
        on_step: Callable[[Step], None] | None,
    ) -> None:
        self.name = name
        self.res = PREFIX + name
        self.aws = aws
        self.apply = apply
        self.timeout = timeout
        self.poll = poll
        self.on_step = on_step
        self.out = DownResult(applied=apply)

    def step(self, verb: Verb, kind: str, what: str, detail: str = "") -> None:
        self.out.steps.append(Step(verb, kind, what, detail))
        if self.on_step is not None:
            self.on_step(self.out.steps[-1])

    def foreign(self, kind: str, tags: Iterable[dict[str, Any]]) -> bool:
        """True (and noted) when a same-named resource is not the run's: it is left alone."""
        if is_ours(tags, self.name):
            return False
        self.step("note", kind, self.res, f"not tagged {TAG}={self.name}: not made by launch for this run, left alone")
        return True

    def group(self) -> None:
        """The group first (its instances with it), then wait until they are gone."""
        res, asg = self.res, self.aws.autoscaling
        g = find_group(asg, res)
        if g is not None and self.foreign("auto scaling group", g.get("Tags", [])):
            g = None
        if g is not None:
            n = len(g.get("Instances", []))
            self.step("delete", "auto scaling group", res, f"terminates its {n} instance(s)")
            if self.apply:
                aws_call(
                    f"DeleteAutoScalingGroup {res}",
                    asg.delete_auto_scaling_group,
                    AutoScalingGroupName=res,
                    ForceDelete=True,
                )
        if self.apply:
            _wait_instances_gone(self.aws, self.name, timeout=self.timeout, poll=self.poll)
            if g is not None:
                _wait_group_gone(asg, res, timeout=self.timeout, poll=self.poll)

    def launch_template(self) -> None:
        res, ec2 = self.res, self.aws.ec2
        lt = find_template(ec2, res)
        if lt is not None and not self.foreign("launch template", lt.get("Tags", [])):
            self.step("delete", "launch template", res)
            if self.apply:
                aws_call(f"DeleteLaunchTemplate {res}", ec2.delete_launch_template, LaunchTemplateName=res)

    def instance_profile(self) -> None:
        res, iam = self.res, self.aws.iam
        try:
            profile = iam.get_instance_profile(InstanceProfileName=res)["InstanceProfile"]
        except Exception as e:
            if error_code(e) != "NoSuchEntity":
                raise LaunchError(f"GetInstanceProfile {res}: {e}") from e
            profile = None
        if profile is None or self.foreign("instance profile", profile.get("Tags", [])):
            return
        self.step("delete", "instance profile", res)
        if self.apply:
            for role in profile.get("Roles", []):
                aws_call(
                    f"RemoveRoleFromInstanceProfile {res}",
                    iam.remove_role_from_instance_profile,
                    InstanceProfileName=res,
                    RoleName=role["RoleName"],
                )
            aws_call(f"DeleteInstanceProfile {res}", iam.delete_instance_profile, InstanceProfileName=res)

    def role(self) -> None:
        """The role and its inline policy; one with managed policies attached by hand is refused."""
        res, iam = self.res, self.aws.iam
        try:
            has_role = not self.foreign("iam role", iam.get_role(RoleName=res)["Role"].get("Tags", []))
        except Exception as e:
            if error_code(e) != "NoSuchEntity":
                raise LaunchError(f"GetRole {res}: {e}") from e
            has_role = False
        if not has_role:
            return
        self.step("delete", "iam role", res, "and its inline policy")
        if not self.apply:
            return
        for pname in aws_call("ListRolePolicies", iam.list_role_policies, RoleName=res).get("PolicyNames", []):
            aws_call(f"DeleteRolePolicy {res}/{pname}", iam.delete_role_policy, RoleName=res, PolicyName=pname)
        attached = aws_call("ListAttachedRolePolicies", iam.list_attached_role_policies, RoleName=res)
        if attached.get("AttachedPolicies"):
            raise LaunchError(
                f"role {res} has managed policies attached by hand "
                f"({', '.join(p['PolicyArn'] for p in attached['AttachedPolicies'])}): detach them, then rerun"
            )
        aws_call(f"DeleteRole {res}", iam.delete_role, RoleName=res)

    def store(self, store: str | None, *, delete_store: bool) -> None:
        """The checkpoints (the run's volume, or the S3 prefix): kept unless ``delete_store``."""
        ec2 = self.aws.ec2
        vols = run_volumes(ec2, self.name)
        for v in vols:
            if delete_store:
                self.step(
                    "delete", "ebs volume", v["VolumeId"], "the run's volume and its checkpoints (--delete-store)"
                )
                if self.apply:
                    _delete_volume(ec2, v["VolumeId"], timeout=self.timeout, poll=self.poll)
            else:
                self.step("keep", "ebs volume", v["VolumeId"], "holds the checkpoints: --delete-store deletes it")
        if store and store.startswith("s3://"):
            if delete_store:
                self.step("delete", "store", store, "every object under the prefix (--delete-store)")
                if self.apply:
                    _delete_prefix(self.aws.s3, store)
            else:
                self.step("keep", "store", store, "the checkpoints: --delete-store deletes them")
        elif delete_store and store is None and not vols:
            self.step("note", "store", "unknown", "no launch template or group names it: pass --store to delete it")

    def leftovers(self, *, delete_store: bool) -> None:
        """What is still tagged: the kept store volume in ``kept``, anything else in ``left``."""
        for t in tagged_resources(self.aws, self.name):
            if t.kind == "volume" and not delete_store:
                self.out.kept.append(t)
            else:
                self.out.left.append(t)


def _wait_instances_gone(aws: Clients, name: str, *, timeout: float, poll: float) -> None:
    """Until no instance of the run is alive (terminating ones release their role and volume)."""
    deadline = time.monotonic() + timeout
    ec2 = aws.ec2
    while True:
        r = aws_call(
            "DescribeInstances",
            ec2.describe_instances,
            Filters=[
                {"Name": f"tag:{TAG}", "Values": [name]},
                {
                    "Name": "instance-state-name",
                    "Values": ["pending", "running", "stopping", "stopped", "shutting-down"],
                },
            ],
        )
        alive = [i["InstanceId"] for res in r.get("Reservations", []) for i in res["Instances"]]
        if not alive:
            return
        if time.monotonic() >= deadline:
            raise LaunchError(f"instances of run {name} still terminating after {timeout:.0f} s: {', '.join(alive)}")
        time.sleep(poll)


def _wait_group_gone(asg: Any, res: str, *, timeout: float, poll: float) -> None:
    """Until DescribeAutoScalingGroups forgets the group ("Delete in progress" lasts minutes on AWS)."""
    deadline = time.monotonic() + timeout
    while True:
        r = aws_call(f"DescribeAutoScalingGroups {res}", asg.describe_auto_scaling_groups, AutoScalingGroupNames=[res])
        if not r.get("AutoScalingGroups"):
            return
        if time.monotonic() >= deadline:
            raise LaunchError(f"auto scaling group {res} is still being deleted after {timeout:.0f} s")
        time.sleep(poll)


def _delete_volume(ec2: Any, volume_id: str, *, timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        v = aws_call("DescribeVolumes", ec2.describe_volumes, VolumeIds=[volume_id])["Volumes"][0]
        if v["State"] == "available":
            aws_call(f"DeleteVolume {volume_id}", ec2.delete_volume, VolumeId=volume_id)
            return
        if v["State"] in ("deleting", "deleted"):
            return
        if time.monotonic() >= deadline:
            raise LaunchError(f"volume {volume_id} is still {v['State']} after {timeout:.0f} s: not deleted")
        time.sleep(poll)


def _delete_prefix(s3: Any, store: str) -> int:
    bucket, prefix = s3_location(store)
    n = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix + "/"}
    while True:
        page = aws_call(f"ListObjectsV2 {store}", s3.list_objects_v2, **kwargs)
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            r = aws_call(
                f"DeleteObjects {store}", s3.delete_objects, Bucket=bucket, Delete={"Objects": keys, "Quiet": True}
            )
            if r.get("Errors"):
                e = r["Errors"][0]
                raise LaunchError(f"deleting {store}: {e.get('Key')}: {e.get('Code')} {e.get('Message')}")
            n += len(keys)
        if not page.get("IsTruncated"):
            return n
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
