"""EC2 instance metadata (IMDS) on loopback: IMDSv2 tokens and their rules, spot
instance-action, the legacy termination-time and rebalance recommendations."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from spotsafe.cloud.times import utcnow
from spotsafe.rehearsal.simulators.server import Response, Simulator

__all__ = ["AWSSimulator"]


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class AWSSimulator(Simulator):
    """EC2 instance metadata (IMDS) with IMDSv2 tokens and spot interruption notices.

    ``require_token=True`` behaves like an instance with ``HttpTokens=required``.
    :meth:`arm` makes ``spot/instance-action`` (and, for terminate, the legacy
    ``spot/termination-time``) appear after ``delay`` seconds, with ``time`` 120 s
    after it appears; :meth:`arm_rebalance` makes the rebalance recommendation
    appear, independently.
    """

    name = "aws"

    def __init__(
        self,
        *,
        port: int = 0,
        instance_id: str = "i-0123456789abcdef0",
        availability_zone: str = "us-east-1a",
        notice_after: float | None = None,
        action: str = "terminate",
        require_token: bool = False,
        instance_type: str = "g5.xlarge",
        account_id: str = "123456789012",
        market: str = "spot",
    ) -> None:
        super().__init__(port=port, notice_after=notice_after)
        _check_action(action)
        self.instance_id = instance_id
        self.availability_zone = availability_zone
        self.region = availability_zone[:-1] if availability_zone[-1:].isalpha() else availability_zone
        self.action = action
        self.require_token = require_token
        self.instance_type = instance_type
        self.account_id = account_id
        #: What ``instance-life-cycle`` answers: "spot" or "on-demand".
        self.market = market
        self.tokens_issued = 0
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._itn: tuple[str, float, str] | None = None  # (action, visible at, time)
        self._rebalance: str | None = None
        self._started_at = utcnow()

    def _on_notice_after(self) -> None:
        self.arm(self.action)

    def arm(self, action: str = "terminate", *, delay: float = 0.0) -> None:
        """The spot interruption notice appears ``delay`` seconds from now."""
        _check_action(action)
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        deadline = utcnow() + timedelta(seconds=delay + 120)
        with self._lock:
            self._itn = (action, time.monotonic() + delay, _iso(deadline))

    def arm_rebalance(self) -> None:
        """The rebalance recommendation appears now."""
        with self._lock:
            self._rebalance = _iso(utcnow())

    def disarm(self) -> None:
        """Withdraw the interruption notice and the rebalance recommendation."""
        with self._lock:
            self._itn = None
            self._rebalance = None

    def expire_tokens(self) -> None:
        """Invalidate every issued token (GETs using one answer 401)."""
        with self._lock:
            self._tokens.clear()

    def _visible_itn(self) -> tuple[str, str] | None:
        with self._lock:
            itn = self._itn
        if itn is None or time.monotonic() < itn[1]:
            return None
        return itn[0], itn[2]

    def identity_document(self) -> dict[str, Any]:
        return {
            "accountId": self.account_id,
            "architecture": "x86_64",
            "availabilityZone": self.availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": "ami-0123456789abcdef0",
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "kernelId": None,
            "pendingTime": _iso(self._started_at),
            "privateIp": "10.0.0.12",
            "ramdiskId": None,
            "region": self.region,
            "version": "2017-09-30",
        }

    def state(self) -> dict[str, Any]:
        itn = self._visible_itn()
        with self._lock:
            return {
                "provider": "aws",
                "endpoint": self.endpoint,
                "armed": self._itn is not None,
                "instance_action": {"action": itn[0], "time": itn[1]} if itn else None,
                "rebalance": {"noticeTime": self._rebalance} if self._rebalance else None,
                "require_token": self.require_token,
                "tokens_issued": self.tokens_issued,
                "requests": len(self.requests),
            }

    def control(self, method: str, action: str, query: Mapping[str, str]) -> bool:
        if action == "arm":
            self.arm(query.get("action", "terminate"), delay=float(query.get("delay", "0")))
        elif action == "rebalance":
            self.arm_rebalance()
        elif action == "disarm":
            self.disarm()
        elif action == "expire-tokens":
            self.expire_tokens()
        else:
            return False
        return True

    def respond(self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes) -> Response:
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, {}, "Method Not Allowed"
            if headers.get("X-Forwarded-For") is not None:
                return 403, {}, "Forbidden"
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            try:
                seconds = int(ttl)
            except (TypeError, ValueError):
                return 400, {}, "Bad Request"
            if not 1 <= seconds <= 21600:
                return 400, {}, "Bad Request"
            token = secrets.token_urlsafe(40)
            with self._lock:
                self._tokens[token] = time.monotonic() + seconds
                self.tokens_issued += 1
            return 200, {"X-aws-ec2-metadata-token-ttl-seconds": str(seconds)}, token
        if method != "GET":
            return 405, {}, "Method Not Allowed"
        token = headers.get("X-aws-ec2-metadata-token")
        if token is not None:
            with self._lock:
                expiry = self._tokens.get(token)
            if expiry is None or time.monotonic() >= expiry:
                return 401, {}, "Unauthorized"
        elif self.require_token:
            return 401, {}, "Unauthorized"
        return self._metadata(path)

    def _metadata(self, path: str) -> Response:
        text = {"Content-Type": "text/plain"}
        json_type = {"Content-Type": "application/json"}
        if path in ("/latest/meta-data", "/latest/meta-data/"):
            listing = "ami-id\nevents/\nhostname\ninstance-id\ninstance-life-cycle\ninstance-type\nlocal-ipv4\nplacement/\nspot/"
            return 200, text, listing
        values = {
            "/latest/meta-data/instance-id": self.instance_id,
            "/latest/meta-data/instance-type": self.instance_type,
            "/latest/meta-data/ami-id": "ami-0123456789abcdef0",
            "/latest/meta-data/local-ipv4": "10.0.0.12",
            "/latest/meta-data/hostname": "ip-10-0-0-12.ec2.internal",
            "/latest/meta-data/placement/availability-zone": self.availability_zone,
            "/latest/meta-data/placement/region": self.region,
            "/latest/meta-data/instance-life-cycle": self.market,
        }
        if path in values:
            return 200, text, values[path]
        if path == "/latest/dynamic/instance-identity/document":
            return 200, json_type, json.dumps(self.identity_document(), indent=2)
        itn = self._visible_itn()
        if path == "/latest/meta-data/spot/instance-action" and itn is not None:
            return 200, json_type, json.dumps({"action": itn[0], "time": itn[1]})
        if path == "/latest/meta-data/spot/termination-time" and itn is not None and itn[0] == "terminate":
            return 200, text, itn[1]
        with self._lock:
            rebalance = self._rebalance
        if path == "/latest/meta-data/events/recommendations/rebalance" and rebalance is not None:
            return 200, json_type, json.dumps({"noticeTime": rebalance})
        return 404, {"Content-Type": "text/html"}, "<html><body><h1>404 - Not Found</h1></body></html>"


def _check_action(action: str) -> None:
    if action not in ("terminate", "stop", "hibernate"):
        raise ValueError(f"spot instance-action must be terminate, stop or hibernate, not {action!r}")
