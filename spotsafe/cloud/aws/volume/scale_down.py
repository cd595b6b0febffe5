"""Finishing a run: stop the Auto Scaling group / persistent spot request from replacing this instance."""

from __future__ import annotations

from typing import Any

from spotsafe.cloud.aws.clients import Calls, aws_error, client, ec2_client, is_botocore_error
from spotsafe.cloud.aws.volume.model import InstanceIdentity

__all__ = ["scale_to_zero"]


def scale_to_zero(
    identity: InstanceIdentity,
    *,
    ec2: Any | None = None,
    autoscaling: Any | None = None,
    asg: bool = True,
    spot: bool = True,
) -> list[str]:
    """Tell AWS to stop replacing this instance once its run is complete.

    If it belongs to an Auto Scaling group: the group's min and desired capacity
    go to 0. If it was launched by a persistent spot request: the request is
    cancelled. Returns what was done (human-readable), [] when nothing applied.
    Shutting the machine down is the caller's part (the boot script does it).
    """
    done: list[str] = []
    iid = identity.instance_id
    if asg:
        autoscaling = autoscaling or client("autoscaling", identity.region)
        try:
            r = autoscaling.describe_auto_scaling_instances(InstanceIds=[iid])
            groups = {i["AutoScalingGroupName"] for i in r.get("AutoScalingInstances", [])}
            for name in sorted(groups):
                autoscaling.update_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, DesiredCapacity=0)
                done.append(f"auto scaling group {name}: desired capacity 0")
        except Exception as e:
            if is_botocore_error(e):
                raise aws_error(e, f"scale down the auto scaling group of {iid}") from e
            raise
    if spot:
        calls = Calls(ec2 or ec2_client(identity.region))
        r = calls(
            "describe_spot_instance_requests",
            f"find the spot request of {iid}",
            Filters=[{"Name": "instance-id", "Values": [iid]}],
        )
        requests = sorted(
            q["SpotInstanceRequestId"]
            for q in r.get("SpotInstanceRequests", [])
            if q.get("State") in ("open", "active", "disabled")
        )
        if requests:
            # A persistent request would launch a replacement for a finished run.
            calls("cancel_spot_instance_requests", f"cancel the spot request of {iid}", SpotInstanceRequestIds=requests)
            done.extend(f"spot request {rid}: cancelled" for rid in requests)
    return done
