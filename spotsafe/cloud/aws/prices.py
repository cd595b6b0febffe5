"""Spot prices from EC2's ``DescribeSpotPriceHistory`` (Linux/UNIX, USD per hour).

One lookup, :func:`price_history`, pages the API; ``spotsafe launch``/``status``/``price``
take the newest price per instance type and zone from it (:func:`spot_prices`), and
the report averages it over the time each launch ran
(:func:`spotsafe.story.cost.spot_price_history`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from spotsafe.cloud.aws.clients import aws_call, client
from spotsafe.errors import require


@dataclass(frozen=True)
class SpotPrice:
    """The spot price of one instance type in one zone from ``time`` on (USD per hour, Linux)."""

    instance_type: str
    zone: str
    price: float
    time: datetime


def price_client(region: str) -> Any:
    """An EC2 client for a price lookup that gives up soon: two tries, five seconds to connect."""
    botocore_config = require("botocore.config", "aws")
    # a lookup is a nicety of the report: two tries, not botocore's patient default
    return client("ec2", region, config=botocore_config.Config(retries={"max_attempts": 2}, connect_timeout=5))


def price_history(
    ec2: Any,
    instance_types: Sequence[str],
    *,
    start: datetime,
    end: datetime | None = None,
    zone: str | None = None,
) -> list[SpotPrice]:
    """Every price ``DescribeSpotPriceHistory`` lists for the types from ``start`` (to ``end``, in ``zone``).

    All pages, in the API's order; botocore's errors are raised as they are. A price
    without a zone is the asked-for ``zone``'s; one without a time zone is in UTC.
    """
    kwargs: dict[str, Any] = {
        "InstanceTypes": list(instance_types),
        "ProductDescriptions": ["Linux/UNIX"],
        "StartTime": start,
    }
    if end is not None:
        kwargs["EndTime"] = end
    if zone is not None:
        kwargs["AvailabilityZone"] = zone
    out: list[SpotPrice] = []
    while True:
        r = ec2.describe_spot_price_history(**kwargs)
        for item in r.get("SpotPriceHistory", []):
            when = item["Timestamp"]
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            where = item.get("AvailabilityZone", zone or "")
            out.append(SpotPrice(item["InstanceType"], where, float(item["SpotPrice"]), when))
        token = r.get("NextToken")
        if not token:
            return out
        kwargs["NextToken"] = token


def spot_prices(ec2: Any, instance_types: Sequence[str], *, now: datetime | None = None) -> list[SpotPrice]:
    """The newest spot price per (type, zone) from DescribeSpotPriceHistory, cheapest first.

    An AWS error is a :class:`~spotsafe.errors.LaunchError` naming DescribeSpotPriceHistory.
    """
    latest: dict[tuple[str, str], SpotPrice] = {}
    history = aws_call(
        "DescribeSpotPriceHistory",
        price_history,
        ec2=ec2,
        instance_types=instance_types,
        start=now or datetime.now(timezone.utc),
    )
    for p in history:
        key = (p.instance_type, p.zone)
        if key not in latest or latest[key].time < p.time:
            latest[key] = p
    return sorted(latest.values(), key=lambda p: (p.price, p.zone, p.instance_type))


def zone_prices(prices: Iterable[SpotPrice]) -> dict[str, float]:
    """The cheapest of the types per zone."""
    out: dict[str, float] = {}
    for p in prices:
        out[p.zone] = min(out.get(p.zone, p.price), p.price)
    return out


def usd(price: float) -> str:
    """A price per hour as the commands print it: ``$0.4520``, or two digits when under a cent."""
    return f"${price:.4f}" if price >= 0.01 else f"${price:.2g}"
