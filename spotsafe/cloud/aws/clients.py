"""The boto3 clients of one region, and what turns AWS's answers and errors into spotsafe's.

Also the tags spotsafe puts on what it creates for a run (``spotsafe-run=NAME``), and
the test of whether a found resource carries them: a resource without them is never
changed or deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from spotsafe.errors import LaunchConfigError, LaunchError, require

#: The tag every resource of a run carries; its value is the run's name.
TAG = "spotsafe-run"
#: On the launch template and the group: the run's store (``status`` and ``down`` read it).
TAG_STORE = "spotsafe-store"


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


def error_code(e: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``NoSuchEntity``, ...); "" for anything else."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_aws_error(e: BaseException) -> bool:
    """True for an error AWS answered or botocore raised (not a bug of the caller's)."""
    return bool(error_code(e)) or type(e).__module__.startswith("botocore")


def aws_call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn``; a botocore error becomes a :class:`LaunchError` naming ``what``."""
    try:
        return fn(**kwargs)
    except Exception as e:
        if is_aws_error(e):
            raise LaunchError(f"{what}: {e}") from e
        raise


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
