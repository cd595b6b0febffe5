"""EC2 spot interruption notices and rebalance recommendations, read through :class:`AWSMetadata`.

A 200 on an interruption endpoint means something is coming whatever its body says: a
malformed body (:class:`MalformedAnswer`) is a notice with the shortest AWS deadline,
never silence.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, cast

from spotsafe.cloud.aws.metadata import AWSMetadata, MalformedAnswer
from spotsafe.cloud.notice import Action, Notice, Source
from spotsafe.cloud.times import parse_iso, utcnow

__all__ = ["AWS_NOTICE_SECONDS", "AWSSource"]

log = logging.getLogger(__name__)

#: How long AWS gives between the interruption notice and the interruption.
AWS_NOTICE_SECONDS = 120.0


class AWSSource(Source):
    """EC2 spot interruption notices and rebalance recommendations through IMDS."""

    name = "aws"

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        rebalance: bool = True,
        timeout: float = 1.0,
        metadata: AWSMetadata | None = None,
    ) -> None:
        self.metadata = metadata if metadata is not None else AWSMetadata(endpoint, timeout=timeout)
        self.rebalance = rebalance
        self._rebalance_seen = False

    def __repr__(self) -> str:
        return f"AWSSource({self.metadata.endpoint!r})"

    def probe(self, timeout: float) -> bool:
        return self.metadata.probe(timeout)

    def poll(self, wait: float) -> Notice | None:
        notice = self._instance_action()
        if notice is None:
            notice = self._termination_time()
        if notice is None and self.rebalance and not self._rebalance_seen:
            notice = self._rebalance_recommendation()
            self._rebalance_seen = notice is not None
        return notice

    def _soon(self, now: datetime) -> datetime:
        return now + timedelta(seconds=AWS_NOTICE_SECONDS)

    def _instance_action(self) -> Notice | None:
        try:
            doc = self.metadata.instance_action
        except MalformedAnswer as e:
            log.warning("%s: treating it as a terminate notice", e)
            now = utcnow()
            return Notice("aws", "terminate", self._soon(now), now, e.body)
        if doc is None:
            return None
        now = utcnow()
        action = str(doc["action"])
        if action not in ("terminate", "stop", "hibernate"):
            log.warning("unknown spot instance-action %r: treating it as terminate", action)
            action = "terminate"
        return Notice("aws", cast(Action, action), parse_iso(str(doc["time"])), now, doc)

    def _termination_time(self) -> Notice | None:
        try:
            deadline = self.metadata.termination_time
        except MalformedAnswer as e:
            log.warning("%s: treating it as a terminate notice", e)
            now = utcnow()
            return Notice("aws", "terminate", self._soon(now), now, {"termination-time": e.body.strip()})
        if deadline is None:
            return None
        text = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")  # as AWS writes it
        return Notice("aws", "terminate", deadline, utcnow(), {"termination-time": text})

    def _rebalance_recommendation(self) -> Notice | None:
        payload: Any
        try:
            payload = self.metadata.rebalance_recommendation
        except MalformedAnswer as e:
            log.warning("%s: still a rebalance recommendation", e)
            payload = e.body
        if payload is None:
            return None
        now = utcnow()
        return Notice("aws", "rebalance", self._soon(now), now, payload)

    def close(self) -> None:
        self.metadata.close()
