"""The volume tool's one entry point: :class:`VolumeManager`, every EC2 step on the run's volume."""

from __future__ import annotations

from spotsafe.cloud.aws.volume.attach import Attaching

__all__ = ["VolumeManager"]


class VolumeManager(Attaching):
    """Finds, claims, moves, attaches, detaches and snapshots the run's EBS volume for this instance.

    ``ec2`` is a boto3 EC2 client; ``identity`` anything with ``instance_id``,
    ``availability_zone`` and ``region`` (:class:`~spotsafe.cloud.aws.volume.model.Identity`,
    :class:`spotsafe.cloud.aws.metadata.AWSMetadata`). Every method does EC2 I/O; every
    wait is bounded by ``timeouts``. Each concern lives in its own module:
    :mod:`~spotsafe.cloud.aws.volume.ec2` (the shared calls), :mod:`~spotsafe.cloud.aws.volume.claim`,
    :mod:`~spotsafe.cloud.aws.volume.detach`, :mod:`~spotsafe.cloud.aws.volume.move`,
    :mod:`~spotsafe.cloud.aws.volume.snapshots` and :mod:`~spotsafe.cloud.aws.volume.attach`.
    """
