"""The persistent EBS volume: find it, bring it to this instance, mount it (formatting only when blank).

A spot run keeps its checkpoints, data and logs on one EBS volume that outlives
the instances it is attached to. On every boot, a replacement instance:

1. finds the volume by id or by tag (``spotsafe-run=mnist``), with its own
   instance id, zone and region taken from the instance metadata service
   (:class:`spotsafe.cloud.aws.metadata.AWSMetadata`); optionally creates it, or restores it from
   the run's newest periodic snapshot, when none exists;
2. waits for the volume to leave the old instance (a bounded force-detach only
   when the old instance is gone: terminated, stopped or unknown);
3. if the volume is in another availability zone and ``move`` is asked for,
   claims it (one mover at a time), snapshots it and creates a copy here with the
   same tags (the old one is retired only once the copy is attached *and* mounted);
4. attaches it and finds its block device (on Nitro by the NVMe serial number,
   which is the volume id without the dash; else the requested ``/dev/sdX`` or
   its ``/dev/xvdX`` twin);
5. mounts it, creating a filesystem only on a device that is blank (no
   signature, zeros at the start) *and* when asked (``--mkfs``, or the volume
   tagged ``spotsafe-new=true``). A device with data is never formatted.

Every step is idempotent: attach + mount twice is a no-op the second time.

The package, by concern: :mod:`~spotsafe.cloud.aws.volume.model` (tags, IAM policy, data),
:mod:`~spotsafe.cloud.aws.volume.manager` (:class:`VolumeManager`, built from
:mod:`~spotsafe.cloud.aws.volume.ec2` (the shared EC2 calls), :mod:`~spotsafe.cloud.aws.volume.claim`
(find, claim), :mod:`~spotsafe.cloud.aws.volume.detach`, :mod:`~spotsafe.cloud.aws.volume.move`
(move, retire), :mod:`~spotsafe.cloud.aws.volume.snapshots` (snapshot, create or restore) and
:mod:`~spotsafe.cloud.aws.volume.attach`), :mod:`~spotsafe.cloud.aws.volume.devices` (block-device
discovery), :mod:`~spotsafe.cloud.aws.volume.filesystem` (probe, mount, fstab),
:mod:`~spotsafe.cloud.aws.volume.scale_down` (`finish`: the Auto Scaling group to zero, the spot request cancelled) and
:mod:`~spotsafe.cloud.aws.volume.cli` (``python -m spotsafe.volume``, exit codes as :class:`ExitCode`).
"""
