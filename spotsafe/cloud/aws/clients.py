"""AWS clients and their errors, for every AWS caller in spotsafe (launch, the volume tool, prices).

A boto3 client per service (``client``, or ``Clients`` for one region's set), and the one
translation of botocore's errors: ``aws_call`` turns them into :class:`LaunchError` for the launch
commands, ``Calls``/``aws_error`` into the :class:`VolumeError` kind an exit code can act on for the
volume tool. Also the tags spotsafe puts on what it creates for a run (``spotsafe-run=NAME``), and
the test of whether a found resource carries them: a resource without them is never changed or
deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from spotsafe.errors import (
    LaunchConfigError,
    LaunchError,
    VolumeAWSError,
    VolumeBusy,
    VolumeError,
    VolumeNotFound,
    VolumePermissionDenied,
    require,
)

#: The tag every resource of a run carries; its value is the run's name.
TAG = "spotsafe-run"
#: On the launch template and the group: the run's store (``status`` and ``down`` read it).
TAG_STORE = "spotsafe-store"

_PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "UnauthorizedAccess"})


def truthy(value: str | None) -> bool:
    """True for ``1``, ``true``, ``yes``, ``on`` (any case, spaces around): a tag or setting that says yes."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def error_code(e: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``NoSuchEntity``, ...); "" for anything else."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_botocore_error(e: BaseException) -> bool:
    """True when ``e`` was raised by botocore or boto3 (an AWS call failed)."""
    return type(e).__module__.startswith(("botocore", "boto3"))


def is_aws_error(e: BaseException) -> bool:
    """True for an error AWS answered or botocore raised (not a bug of the caller's)."""
    return bool(error_code(e)) or is_botocore_error(e)


def aws_call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn``; a botocore error becomes a :class:`LaunchError` naming ``what``."""
    try:
        return fn(**kwargs)
    except Exception as e:
        if is_aws_error(e):
            raise LaunchError(f"{what}: {e}") from e
        raise


def aws_error(e: BaseException, what: str) -> VolumeError:
    """Turn a botocore exception into the VolumeError a caller (and the exit code) can act on."""
    response = getattr(e, "response", None)
    if isinstance(response, Mapping):
        err = response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "")) or str(e)
        if code in _PERMISSION_CODES:
            return VolumePermissionDenied(
                f"{what}: permission denied by IAM ({code}: {message}); the instance role needs "
                "the policy in docs/volume.md"
            )
        if code.startswith("InvalidVolume.NotFound") or code == "InvalidVolumeID.Malformed":
            return VolumeNotFound(f"{what}: no such volume ({code}: {message})")
        if code in ("VolumeInUse", "IncorrectState", "InvalidAttachment.NotFound"):
            return VolumeBusy(f"{what}: {code}: {message}")
        return VolumeAWSError(f"{what}: EC2 error {code}: {message}")
    return VolumeAWSError(f"{what}: {type(e).__name__}: {e}")


class Calls:
    """Wraps every EC2 call so a botocore error becomes a VolumeError naming the call."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, op: str, what: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, op)(**kwargs)
        except Exception as e:
            if is_botocore_error(e):
                raise aws_error(e, f"{what} ({op})") from e
            raise


def client(service: str, region: str, *, endpoint_url: str | None = None, config: Any = None) -> Any:
    """A boto3 client of ``service`` for ``region`` (``config``: a botocore ``Config``); MissingDependency without boto3."""
    boto3 = require("boto3", "aws")
    kwargs: dict[str, Any] = {"region_name": region}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if config is not None:
        kwargs["config"] = config
    return boto3.client(service, **kwargs)


def ec2_client(region: str, *, endpoint_url: str | None = None) -> Any:
    """A boto3 EC2 client for ``region``. ``AWS_ENDPOINT_URL_EC2`` is honoured by botocore."""
    return client("ec2", region, endpoint_url=endpoint_url)


class Clients:
    """The boto3 clients of one region (botocore honours ``AWS_ENDPOINT_URL`` and friends)."""

    def __init__(self, region: str | None = None, *, session: Any | None = None) -> None:
        boto3 = require("boto3", "aws")
        self.session = session if session is not None else boto3.session.Session()
        self.region: str = region or self.session.region_name or ""
        if not self.region:
            raise LaunchConfigError("no AWS region: pass --region or set AWS_REGION / AWS_DEFAULT_REGION")
        self._clients: dict[str, Any] = {}

    def __call__(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.session.client(service, region_name=self.region)
        return self._clients[service]

    @property
    def ec2(self) -> Any:
        return self("ec2")

    @property
    def autoscaling(self) -> Any:
        return self("autoscaling")

    @property
    def iam(self) -> Any:
        return self("iam")

    @property
    def s3(self) -> Any:
        return self("s3")


def is_ours(tags: Iterable[dict[str, Any]], name: str) -> bool:
    """True when ``tags`` (any AWS shape) include ``spotsafe-run=NAME``: launch made it for this run."""
    return any(t.get("Key") == TAG and t.get("Value") == name for t in tags)


def not_ours(kind: str, res: str, name: str) -> LaunchError:
    """The error for a same-named resource that lacks the run's tag: somebody else's, never taken over."""
    return LaunchError(
        f"{kind} {res} exists but is not tagged {TAG}={name}: not made by spotsafe launch for this run; "
        "pick another run name"
    )


def run_tags(name: str, store: str | None = None) -> list[dict[str, str]]:
    """The tags of a resource made for run ``name`` (and its store, where ``status``/``down`` read it)."""
    tags = [{"Key": TAG, "Value": name}]
    if store is not None:
        tags.append({"Key": TAG_STORE, "Value": store})
    return tags
