"""``spotsafe status NAME``: the run's group and instances, its newest checkpoint, interruptions and cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

from spotsafe import units
from spotsafe.checkpoint.completion import read_completion
from spotsafe.cloud.aws.clients import Clients, aws_call
from spotsafe.cloud.aws.launch.resources import find_group, run_store, run_volumes
from spotsafe.cloud.aws.launch.spec import PREFIX, check_name
from spotsafe.cloud.aws.prices import spot_prices, usd
from spotsafe.errors import LaunchError, SpotsafeError
from spotsafe.storage.registry import open_store
from spotsafe.story.cost import Prices
from spotsafe.story.facts import StoreReport


@dataclass(kw_only=True)
class StoreFacts:
    """A run's progress as its store tells it (every cloud's ``status`` shows these)."""

    store: str | None = None
    checkpoints: int | None = None
    newest: Any = None
    complete: dict[str, Any] | None = None
    store_error: str | None = None
    report: dict[str, Any] | None = None
    report_note: str | None = None

    def read(self, *, storage_options: dict[str, Any] | None = None, on_demand_price: float | None = None) -> None:
        """Fill in the newest checkpoint, the completion mark and the report's facts from ``self.store``."""
        if not self.store:
            return
        from spotsafe.checkpoint.catalog import Catalog  # imports torch: only when there is a store to read

        try:
            with open_store(self.store, storage_options=storage_options) as opened:
                catalog = Catalog(opened)
                self.checkpoints = len(catalog.list())
                self.newest = catalog.latest()
                self.complete = read_completion(opened)
        except (SpotsafeError, OSError) as e:
            self.store_error = str(e)
            return
        self.report, self.report_note = report_facts(self.store, on_demand_price)

    def read_remote(self, scheme: str, disk: str, **kwargs: Any) -> None:
        """:meth:`read` an object store (``scheme``, e.g. ``s3://``); a store on the run's ``disk`` is said to be there."""
        if self.store and self.store.startswith(scheme):
            self.read(**kwargs)
        elif self.store:
            self.store_error = f"on the run's {disk}: readable from its instance (spotsafe ls there)"

    def format(self, out: TextIO) -> None:
        print(f"  store {self.store or '(unknown)'}", file=out)
        if self.store_error:
            print(f"    {self.store_error}", file=out)
        elif self.checkpoints is not None:
            n = self.newest
            if n is None:
                print(f"    no intact checkpoint yet ({self.checkpoints} listed)", file=out)
            else:
                epoch = "" if n.epoch is None else f", epoch {n.epoch}"
                age = units.age(time.time() - n.time.timestamp())
                print(
                    f"    newest checkpoint: step {n.step}{epoch} ({n.reason}, {age} ago); {self.checkpoints} kept",
                    file=out,
                )
            if self.complete is not None:
                print(f"    run complete at step {self.complete.get('step')}", file=out)
        if self.report is not None:
            r = self.report
            interruptions = r.get("interruptions", [])
            count = len(interruptions) if isinstance(interruptions, list) else interruptions
            launches = r.get("launches", [])
            print(
                f"    interruptions: {count}; launches: {len(launches) if isinstance(launches, list) else launches}; "
                f"steps lost: {r.get('steps_lost', '?')}",
                file=out,
            )
            line = cost_line(r.get("cost"))
            if line:
                print(f"    {line}", file=out)
        elif self.report_note:
            print(f"    {self.report_note}", file=out)


def format_group(
    out: TextIO, title: str, group: str | None, size: int | None, missing: str, members: list[str], facts: StoreFacts
) -> None:
    """A GCP or Azure run's status: a title, the group line (or ``missing``), its members, the store."""
    print(title, file=out)
    if group is not None and size == 0:
        group += " (at zero: the run finished; spotsafe down removes what is left)"
    print(f"  {group if group is not None else missing}", file=out)
    for line in members:
        print(f"  {line}", file=out)
    facts.format(out)


@dataclass(kw_only=True)
class Status(StoreFacts):
    name: str
    region: str
    group: dict[str, Any] | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    volume: dict[str, Any] | None = None
    prices: dict[tuple[str, str], float] = field(default_factory=dict)


def status(
    name: str,
    aws: Clients,
    *,
    storage_options: dict[str, Any] | None = None,
    on_demand_price: float | None = None,
) -> Status:
    """The run's group and instances, its newest checkpoint and progress, and the report's facts.

    ``on_demand_price`` (USD per hour): what the report compares the spot cost with.
    """
    check_name(name)
    res = PREFIX + name
    st = Status(name=name, region=aws.region)
    st.group = find_group(aws.autoscaling, res)
    ids = [i["InstanceId"] for i in (st.group or {}).get("Instances", [])]
    if ids:
        for r in aws_call("DescribeInstances", aws.ec2.describe_instances, InstanceIds=ids).get("Reservations", []):
            st.instances.extend(r["Instances"])
        types = sorted({i["InstanceType"] for i in st.instances})
        try:
            for p in spot_prices(aws.ec2, types):
                st.prices[(p.instance_type, p.zone)] = p.price
        except LaunchError:
            pass  # prices are a nicety here: status still shows the rest
    vols = run_volumes(aws.ec2, name)
    st.volume = vols[0] if vols else None
    st.store = run_store(aws, name)
    st.read_remote("s3://", "EBS volume", storage_options=storage_options, on_demand_price=on_demand_price)
    return st


def report_facts(store: str, on_demand_price: float | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The report's facts (what ``spotsafe report STORE --json --lookup-prices`` prints): interruptions, cost.

    Returns (facts, None), or (None, a note saying why there are none): the report is
    a nicety of ``status``, never the reason it fails.
    """
    try:
        opened = open_store(store)
        try:
            facts, _events = StoreReport(opened).build(Prices(on_demand=on_demand_price), lookup=True)
        finally:
            opened.close()
    except Exception as e:  # noqa: BLE001 - the report is optional here: its failure is shown, not raised
        return None, f"interruptions and cost: spotsafe report failed ({e})"
    return facts, None


def cost_line(cost: Any) -> str | None:
    """The report's cost facts in one line: spot spent, and on demand for the same hours."""
    if not isinstance(cost, dict):
        return None
    billed = cost.get("billed_hours")
    spot = cost.get("spot_cost")
    parts = []
    if isinstance(billed, (int, float)):
        parts.append(f"{billed:.2f} instance-hours billed")
    parts.append("spot cost unknown" if not isinstance(spot, (int, float)) else f"spot ${spot:.2f}")
    same = cost.get("on_demand_cost_same_hours")
    if isinstance(same, (int, float)):
        saving = cost.get("savings")
        tail = f", {saving * 100:.0f}% saved" if isinstance(saving, (int, float)) else ""
        parts.append(f"on demand ${same:.2f} for the same hours{tail}")
    else:
        parts.append("on demand: pass --on-demand-price USD/h to compare")
    return "cost: " + "; ".join(parts)


def format_status(st: Status, out: TextIO) -> None:
    print(f"run {st.name} ({st.region})", file=out)
    g = st.group
    if g is None:
        print(f"  group {PREFIX}{st.name}: none (not launched, or taken down)", file=out)
    else:
        mip = g.get("MixedInstancesPolicy", {})
        types = ",".join(o.get("InstanceType", "?") for o in mip.get("LaunchTemplate", {}).get("Overrides", []))
        strategy = mip.get("InstancesDistribution", {}).get("SpotAllocationStrategy", "?")
        print(
            f"  group {g['AutoScalingGroupName']}: desired {g['DesiredCapacity']} (min {g['MinSize']}, "
            f"max {g['MaxSize']}), spot over {types}, {strategy}"
            + (", capacity rebalancing" if g.get("CapacityRebalance") else ""),
            file=out,
        )
        if g["DesiredCapacity"] == 0:
            print("  scaled to zero: the run finished (spotsafe down removes what is left)", file=out)
        by_id = {i["InstanceId"]: i for i in st.instances}
        for gi in g.get("Instances", []):
            inst = by_id.get(gi["InstanceId"], {})
            market = "spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand"
            zone = gi.get("AvailabilityZone", "?")
            itype = gi.get("InstanceType") or inst.get("InstanceType") or "?"
            price = st.prices.get((itype, zone))
            up = ""
            if isinstance(inst.get("LaunchTime"), datetime):
                hours = (datetime.now(timezone.utc) - inst["LaunchTime"]).total_seconds() / 3600
                up = f", up {hours:.1f} h"
            print(
                f"  instance {gi['InstanceId']} {itype} {zone} {market} {gi.get('LifecycleState', '?')}"
                f" {gi.get('HealthStatus', '')}{up}" + (f", spot now {usd(price)}/h" if price is not None else ""),
                file=out,
            )
    if st.volume is not None:
        v = st.volume
        held = ", ".join(a["InstanceId"] for a in v.get("Attachments", [])) or "not attached"
        print(f"  volume {v['VolumeId']}: {v['Size']} GiB in {v['AvailabilityZone']}, {held}", file=out)
    st.format(out)
