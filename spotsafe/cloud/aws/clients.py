"""AWS clients and their errors: a boto3 client per service, and every botocore error as a VolumeError naming the call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spotsafe.errors import (
    VolumeAWSError,
    VolumeBusy,
    VolumeError,
    VolumeNotFound,
    VolumePermissionDenied,
    require,
)

__all__ = ["Calls", "aws_error", "client", "ec2_client", "is_botocore_error", "truthy"]

_PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "UnauthorizedAccess"})


def truthy(value: str | None) -> bool:
    """True for ``1``, ``true``, ``yes``, ``on`` (any case, spaces around): a tag or setting that says yes."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


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


def is_botocore_error(e: BaseException) -> bool:
    """True when ``e`` was raised by botocore or boto3 (an AWS call failed)."""
    return type(e).__module__.startswith(("botocore", "boto3"))


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


def ec2_client(region: str, *, endpoint_url: str | None = None) -> Any:
    """A boto3 EC2 client for ``region``. ``AWS_ENDPOINT_URL_EC2`` is honoured by botocore."""
    return client("ec2", region, endpoint_url=endpoint_url)


def client(service: str, region: str, *, endpoint_url: str | None = None) -> Any:
    """A boto3 client of ``service`` for ``region``; raises MissingDependency without boto3."""
    boto3 = require("boto3", "aws")
    kwargs: dict[str, Any] = {"region_name": region}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return boto3.client(service, **kwargs)
