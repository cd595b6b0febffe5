"""What a run cost: billed instance-hours at spot prices, against on-demand for the same hours.

Prices come from the user (``--spot-price 0.45``, ``--price g5.xlarge=0.45``,
``--on-demand-price 1.006``) or, for the spot price, from EC2's
``DescribeSpotPriceHistory`` for each launch's instance type and zone over the time
it ran (:func:`spot_price_history`, through :func:`spotsafe.cloud.aws.prices.price_history`;
needs ``spotsafe[aws]`` and credentials that allow ``ec2:DescribeSpotPriceHistory``).

A launch is billed from its process start (the instance's boot before it is not
seen by the run) to its last recorded event; the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from spotsafe.cloud.aws.prices import price_client, price_history
from spotsafe.errors import SpotsafeError

__all__ = ["Prices", "cost_of", "spot_price_history"]

log = logging.getLogger(__name__)


class PriceLookupError(SpotsafeError, OSError):
    """EC2 could not be asked for spot prices (credentials, permissions, endpoint)."""


@dataclass
class Prices:
    """Hourly prices in USD: one spot price for every launch, or one per instance type."""

    spot: float | None = None
    by_type: dict[str, float] = field(default_factory=dict)
    on_demand: float | None = None
    #: (instance type, zone, start, end) -> looked-up average spot price
    looked_up: dict[tuple[str, str, float, float], float] = field(default_factory=dict)
    #: Where each price came from, for the report.
    source: str = "given"

    @staticmethod
    def parse_type_prices(pairs: Sequence[str]) -> dict[str, float]:
        """``["g5.xlarge=0.45", ...]`` -> ``{"g5.xlarge": 0.45}``; a clear error on anything else."""
        out: dict[str, float] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            try:
                price = float(value)
            except ValueError:
                price = -1.0
            if not sep or not name or price < 0:
                raise ValueError(f"--price wants INSTANCE_TYPE=USD_PER_HOUR (e.g. g5.xlarge=0.45), got {pair!r}")
            out[name] = price
        return out

    def spot_for(self, launch: Mapping[str, Any]) -> float | None:
        key = (
            str(launch.get("instance_type")),
            str(launch.get("zone")),
            float(launch.get("billed_from") or 0.0),
            float(launch.get("ended") or 0.0),
        )
        if key in self.looked_up:
            return self.looked_up[key]
        itype = launch.get("instance_type")
        if isinstance(itype, str) and itype in self.by_type:
            return self.by_type[itype]
        return self.spot


def spot_price_history(instance_type: str, zone: str, start: float, end: float, *, client: Any = None) -> float | None:
    """The time-weighted average spot price (USD/hour) of ``instance_type`` in ``zone`` over [start, end].

    Asks ``DescribeSpotPriceHistory`` (Linux/UNIX); None when EC2 has no price for it.
    """
    region = zone[:-1] if zone[-1:].isalpha() else zone
    ec2 = client or price_client(region)
    t0 = datetime.fromtimestamp(start, timezone.utc)
    t1 = datetime.fromtimestamp(max(end, start), timezone.utc)
    try:
        history = price_history(ec2, [instance_type], start=t0, end=t1, zone=zone)
    except Exception as e:  # botocore's errors are many; all mean: could not look it up
        raise PriceLookupError(f"DescribeSpotPriceHistory for {instance_type} in {zone}: {e}") from e
    points = [(p.time.timestamp(), p.price) for p in history if p.zone == zone]
    if not points:
        return None
    points.sort()
    # The price in effect at each moment is the last one announced at or before it.
    total = 0.0
    weighted = 0.0
    for i, (when, price) in enumerate(points):
        seg_start = max(when, start) if i else start
        seg_end = points[i + 1][0] if i + 1 < len(points) else end
        seg_end = min(seg_end, end)
        if seg_end > seg_start:
            weighted += price * (seg_end - seg_start)
            total += seg_end - seg_start
    return weighted / total if total > 0 else points[-1][1]


def look_up(prices: Prices, launches: Sequence[Mapping[str, Any]], *, client: Any = None) -> list[str]:
    """Fill ``prices.looked_up`` for every launch with a known type and zone; problems as text."""
    problems: list[str] = []
    clients: dict[str, Any] = {}
    for launch in launches:
        itype, zone = launch.get("instance_type"), launch.get("zone")
        if not isinstance(itype, str) or not isinstance(zone, str):
            continue
        start, end = float(launch.get("billed_from") or 0.0), float(launch.get("ended") or 0.0)
        region = zone[:-1] if zone[-1:].isalpha() else zone
        try:
            if client is None and region not in clients:
                clients[region] = price_client(region)
            price = spot_price_history(itype, zone, start, end, client=client or clients[region])
        except PriceLookupError as e:
            problems.append(str(e))
            continue
        if price is not None:
            prices.looked_up[(itype, zone, start, end)] = price
            prices.source = "DescribeSpotPriceHistory"
    return problems


def cost_of(launches: Sequence[Mapping[str, Any]], training_s: float, prices: Prices | None) -> dict[str, Any]:
    """Billed hours and cost of ``launches`` (as the report lists them) against on-demand."""
    billed_s = sum(float(launch.get("billed_s") or 0.0) for launch in launches)
    out: dict[str, Any] = {
        "currency": "USD",
        "billed_hours": round(billed_s / 3600, 6),
        "training_hours": round(training_s / 3600, 6),
        "spot_cost": None,
        "on_demand_price": None,
        "on_demand_cost_same_hours": None,
        "on_demand_cost_training_hours": None,
        "savings": None,
        "per_launch": [],
        "price_source": None,
    }
    if prices is None:
        return out
    total = 0.0
    known = True
    for launch in launches:
        price = prices.spot_for(launch)
        hours = float(launch.get("billed_s") or 0.0) / 3600
        cost = None if price is None else round(price * hours, 10)
        if cost is None:
            known = False
        else:
            total += cost
        out["per_launch"].append(
            {"launch": launch.get("id"), "spot_price": price, "hours": round(hours, 6), "cost": cost}
        )
    if known and launches:
        out["spot_cost"] = round(total, 10)
        out["price_source"] = prices.source
    if prices.on_demand is not None:
        out["on_demand_price"] = prices.on_demand
        out["on_demand_cost_same_hours"] = round(prices.on_demand * billed_s / 3600, 6)
        out["on_demand_cost_training_hours"] = round(prices.on_demand * training_s / 3600, 6)
        if out["spot_cost"] is not None and out["on_demand_cost_same_hours"]:
            out["savings"] = round(1 - out["spot_cost"] / out["on_demand_cost_same_hours"], 6)
    return out
