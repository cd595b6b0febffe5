"""IAM policies, checked: ``parliament``'s lint, and IAM's evaluation of Allow statements with conditions.

``parliament`` (dev extra) still imports ``pkg_resources``, which setuptools no longer
ships; :func:`lint` gives it the one function it calls (``resource_filename``) first.

:func:`allows` is IAM's evaluation for what spotsafe's policies hold (Allow statements
only, ``Action``/``Resource`` with ``*``/``?`` wildcards, the condition operators
spotsafe uses): a request is allowed when every resource it touches is allowed by some
statement whose every condition holds on the request's context.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


def _parliament() -> Any:
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")

            def resource_filename(package: str, name: str) -> str:
                return str(resources.files(package) / name)

            shim.resource_filename = resource_filename  # type: ignore[attr-defined]
            sys.modules["pkg_resources"] = shim
    with warnings.catch_warnings():
        # parliament opens its data files at import and never closes them: collect them here, quietly.
        warnings.simplefilter("ignore", ResourceWarning)
        import parliament

        gc.collect()
    return parliament


def lint(policy: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """parliament's findings on ``policy``: (severity, issue, detail)."""
    parliament = _parliament()
    result = parliament.analyze_policy_string(json.dumps(policy), include_community_auditors=True)
    return [(f.severity, f.issue, str(f.detail)) for f in map(parliament.enhance_finding, result.findings)]


def above_low(findings: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [f for f in findings if f[0] not in ("LOW", "INFO", "MUTE")]


@dataclass
class Request:
    """One API call as IAM judges it: its action, the resources it touches, its context keys."""

    action: str
    resources: list[str]
    context: dict[str, list[str]] = field(default_factory=dict)
    #: Context keys per resource (aws:ResourceTag/... differs from one resource to the next).
    per_resource: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def _match(patterns: Any, value: str) -> bool:
    pats = [patterns] if isinstance(patterns, str) else patterns
    return any(fnmatch.fnmatchcase(value, p) for p in pats)


def _aliases(key: str) -> list[str]:
    # ec2:ResourceTag/K and aws:ResourceTag/K name the same thing (as autoscaling:ResourceTag/K does).
    for prefix in ("ec2:ResourceTag/", "autoscaling:ResourceTag/"):
        if key.startswith(prefix):
            return [key, "aws:ResourceTag/" + key[len(prefix) :]]
    return [key]


def _condition_holds(op: str, key: str, wanted: Any, ctx: Mapping[str, list[str]]) -> bool:
    values: list[str] | None = None
    for k in _aliases(key):
        if k in ctx:
            values = ctx[k]
            break
    wanted_list = [str(w) for w in (wanted if isinstance(wanted, list) else [wanted])]
    if op == "Null":
        return (values is None) == (wanted_list[0] == "true")
    quantifier, _, base = op.rpartition(":")
    if_exists = base.endswith("IfExists")
    base = base.removesuffix("IfExists")
    if values is None:
        return if_exists or quantifier == "ForAllValues"

    def one(v: str) -> bool:
        if base == "StringEquals":
            return v in wanted_list
        if base == "StringLike":
            return any(fnmatch.fnmatchcase(v, w) for w in wanted_list)
        if base == "NumericEquals":
            return any(float(v) == float(w) for w in wanted_list)
        raise AssertionError(f"condition operator {op} is not known to this evaluator")

    if quantifier == "ForAllValues":
        return all(one(v) for v in values)
    return any(one(v) for v in values)


def statement_allows(st: Mapping[str, Any], action: str, resource: str, ctx: Mapping[str, list[str]]) -> bool:
    if st["Effect"] != "Allow" or not _match(st["Action"], action) or not _match(st["Resource"], resource):
        return False
    return all(
        _condition_holds(op, key, wanted, ctx)
        for op, block in st.get("Condition", {}).items()
        for key, wanted in block.items()
    )


def denied(policy: Mapping[str, Any], request: Request) -> list[str]:
    """The resources of ``request`` no statement of ``policy`` allows ([]: the call is allowed)."""
    out = []
    for resource in request.resources:
        ctx = {**request.context, **request.per_resource.get(resource, {})}
        if not any(statement_allows(st, request.action, resource, ctx) for st in policy["Statement"]):
            out.append(resource)
    return out


ACCOUNT = "123456789012"  # moto's
REGION = "us-east-1"


def _tag_keys(tags: Sequence[Mapping[str, str]] | None) -> dict[str, list[str]]:
    if tags is None:
        return {}
    ctx: dict[str, list[str]] = {"aws:TagKeys": [t["Key"] for t in tags]}
    for t in tags:
        if "Value" in t:
            ctx[f"aws:RequestTag/{t['Key']}"] = [t["Value"]]
    return ctx


class CallJudge:
    """Judges each EC2 / Auto Scaling / SSM / Secrets Manager call, as it is made, against ``policy``.

    Hook it on a client (``client.meta.events.register("before-parameter-build", judge.hook)``);
    it looks the touched resources' tags up with the admin clients (AWS evaluates
    ``aws:ResourceTag`` at the time of the call) and keeps every call in :attr:`calls`
    and the ones the policy does not allow in :attr:`denials`.
    """

    def __init__(self, policy: Mapping[str, Any], ec2: Any, autoscaling: Any) -> None:
        self.policy = policy
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self.calls: list[Request] = []
        self.denials: list[tuple[Request, list[str]]] = []

    def hook(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.judge(model.service_model.signing_name, model.name, params)

    def judge(self, service: str, op: str, params: dict[str, Any]) -> None:
        """Judge one call (``service``: the signing name, ``op``: the API operation)."""
        for request in self.requests(service, op, params):
            self.calls.append(request)
            bad = denied(self.policy, request)
            if bad:
                self.denials.append((request, bad))

    def denied(self, request: Request) -> list[str]:
        return denied(self.policy, request)

    @property
    def actions(self) -> set[str]:
        return {r.action for r in self.calls}

    def _ec2_tags(self, resource_id: str) -> dict[str, list[str]]:
        r = self.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [resource_id]}])
        return {f"aws:ResourceTag/{t['Key']}": [t["Value"]] for t in r.get("Tags", [])}

    def _ec2_arn(self, resource_id: str) -> str:
        kind = {"vol": "volume", "snap": "snapshot", "i": "instance", "sir": "spot-instances-request"}
        prefix = resource_id.split("-")[0]
        account = "" if prefix == "snap" else ACCOUNT
        return f"arn:aws:ec2:{REGION}:{account}:{kind[prefix]}/{resource_id}"

    def _existing(self, action: str, ids: Sequence[str], context: dict[str, list[str]] | None = None) -> Request:
        arns = [self._ec2_arn(i) for i in ids]
        per = {arn: self._ec2_tags(i) for arn, i in zip(arns, ids, strict=True)}
        return Request(action, arns, context or {}, per)

    def requests(self, service: str, op: str, params: dict[str, Any]) -> list[Request]:
        action = f"{service}:{op}"
        if op.startswith(("Describe", "List")):
            return [Request(action, ["*"])]
        if service == "ec2":
            return self._ec2(action, op, params)
        if service == "autoscaling" and op == "UpdateAutoScalingGroup":
            name = params["AutoScalingGroupName"]
            g = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
            ctx = {f"aws:ResourceTag/{t['Key']}": [t["Value"]] for t in g.get("Tags", [])}
            for key in ("MinSize", "MaxSize", "DesiredCapacity"):
                if key in params:
                    ctx[f"autoscaling:{key}"] = [str(params[key])]
            return [Request(action, [g["AutoScalingGroupARN"]], ctx)]
        if service == "ssm" and op in ("GetParameter", "GetParameters"):
            names = [params["Name"]] if op == "GetParameter" else params["Names"]
            return [Request(action, [f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/{n.lstrip('/')}" for n in names])]
        if service == "secretsmanager" and op == "GetSecretValue":
            sid = params["SecretId"]
            arn = sid if sid.startswith("arn:") else f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{sid}-AbCdEf"
            return [Request(action, [arn])]
        raise AssertionError(f"{action}: a call this judge does not know yet (teach tests/iampolicy.py)")

    def _ec2(self, action: str, op: str, params: dict[str, Any]) -> list[Request]:
        specs = params.get("TagSpecifications", [])
        tags = [t for s in specs for t in s.get("Tags", [])] if specs else None
        if op == "AttachVolume":
            return [self._existing(action, [params["VolumeId"], params["InstanceId"]])]
        if op == "DetachVolume":
            ids = [params["VolumeId"]]
            if "InstanceId" in params:
                ids.append(params["InstanceId"])
            else:
                v = self.ec2.describe_volumes(VolumeIds=[params["VolumeId"]])["Volumes"][0]
                ids += [a["InstanceId"] for a in v.get("Attachments", [])]
            return [self._existing(action, ids)]
        if op in ("CreateTags", "DeleteTags"):
            return [self._existing(action, params["Resources"], _tag_keys(params.get("Tags")))]
        if op in ("DeleteVolume", "DeleteSnapshot"):
            return [self._existing(action, [params.get("VolumeId") or params["SnapshotId"]])]
        if op == "CancelSpotInstanceRequests":
            return [self._existing(action, params["SpotInstanceRequestIds"])]
        if op in ("CreateSnapshot", "CreateVolume"):
            made = f"arn:aws:ec2:{REGION}::snapshot/*" if op == "CreateSnapshot" else self._ec2_arn("vol-*")
            source = params.get("VolumeId") if op == "CreateSnapshot" else params.get("SnapshotId")
            req = self._existing(action, [source]) if source else Request(action, [])
            req.resources.append(made)
            req.context.update(_tag_keys(tags))
            out = [req]
            if tags is not None:  # tagging on create is authorised as ec2:CreateTags too
                ctx = {**_tag_keys(tags), "ec2:CreateAction": [op]}
                out.append(Request("ec2:CreateTags", [made], ctx))
            return out
        raise AssertionError(f"{action}: a call this judge does not know yet (teach tests/iampolicy.py)")


def actions_only(policy: Mapping[str, Any]) -> dict[str, Any]:
    """``policy`` as moto's IAM enforcement can judge it: its actions on ``"*"`` (moto checks neither
    resource tags nor most resources); :class:`CallJudge` judges the resources and conditions."""
    statements = [{"Effect": st["Effect"], "Action": st["Action"], "Resource": "*"} for st in policy["Statement"]]
    return {"Version": policy["Version"], "Statement": statements}


# --------------------------------------------------------------------------- moto's recorder

#: Query-protocol list parameters (``Name.N``) the judge reads, and their API names.
_LISTS = {"ResourceId": "Resources", "SpotInstanceRequestId": "SpotInstanceRequestIds"}


def _query_params(form: Mapping[str, str]) -> dict[str, Any]:
    """EC2 / Auto Scaling form fields (``VolumeId=…&Tag.1.Key=…``) as the judge's API parameters."""
    params: dict[str, Any] = {}
    tags: dict[str, dict[str, str]] = {}
    specs: dict[str, dict[str, dict[str, str]]] = {}
    for key, value in form.items():
        parts = key.split(".")
        if parts[0] in _LISTS and len(parts) == 2:
            params.setdefault(_LISTS[parts[0]], []).append(value)
        elif parts[0] in ("Tag", "Tags") and len(parts) == 3:
            tags.setdefault(parts[1], {})[parts[2]] = value
        elif parts[0] == "TagSpecification" and len(parts) == 5 and parts[2] == "Tag":
            specs.setdefault(parts[1], {}).setdefault(parts[3], {})[parts[4]] = value
        elif len(parts) == 1:
            params[key] = int(value) if key in ("MinSize", "MaxSize", "DesiredCapacity") else value
    if tags:
        params["Tags"] = [tags[k] for k in sorted(tags, key=int)]
    if specs:
        params["TagSpecifications"] = [{"Tags": [s[k] for k in sorted(s, key=int)]} for s in specs.values()]
    return params


def recorded_calls(path: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(service, operation, parameters) of every EC2 / Auto Scaling / SSM / Secrets Manager request
    in a moto recording (``moto.moto_api.recorder``); S3 and moto's own endpoints are left out."""
    import base64
    import re
    from urllib.parse import parse_qsl

    out: list[tuple[str, str, dict[str, Any]]] = []
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            m = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", headers.get("authorization", ""))
            service = m.group(1) if m else ""
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            if service in ("ec2", "autoscaling"):
                form = dict(parse_qsl(body, keep_blank_values=True))
                out.append((service, form.pop("Action"), _query_params(form)))
            elif service in ("ssm", "secretsmanager"):
                op = headers["x-amz-target"].split(".")[-1]
                out.append((service, op, json.loads(body or "{}")))
    return out
