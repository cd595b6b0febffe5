"""The exceptions spotsafe raises.

Every leaf also subclasses the built-in exception a caller would already catch,
so ``except FileNotFoundError`` keeps working around spotsafe calls. Messages
name the path or URL and the cause; causes are chained with ``from``.
"""

from __future__ import annotations


class SpotsafeError(Exception):
    """Base class of every error spotsafe raises on purpose."""


class StoreError(SpotsafeError, OSError):
    """A store could not be read or written (permissions, full disk, network, bucket)."""


class CheckpointNotFound(SpotsafeError, FileNotFoundError):
    """No checkpoint (or no intact one) where one was asked for."""


class CheckpointCorrupt(SpotsafeError, ValueError):
    """A checkpoint exists but its files do not match its manifest."""


class FormatVersionError(SpotsafeError, ValueError):
    """A manifest written by a newer (or unknown) spotsafe format."""


class UnsafeCheckpoint(SpotsafeError, ValueError):
    """A checkpoint asks for something the safe loader refuses to do (e.g. unpickle)."""


class MetadataError(SpotsafeError, OSError):
    """A cloud metadata endpoint answered in a way spotsafe cannot use."""


class VolumeError(SpotsafeError, RuntimeError):
    """Finding, attaching or mounting the persistent volume failed."""

    exit_code: int = 1


class DistributedError(SpotsafeError, RuntimeError):
    """Ranks failed to agree or to finish a collective checkpoint in time."""


class WriterFenced(SpotsafeError, PermissionError):
    """This writer's lease on the store was taken over by a newer generation (or released).

    A superseded writer never commits a manifest: its save raises this instead.
    ``spotsafe.Run`` then exits with :data:`spotsafe.EXIT_FENCED`, which
    ``python -m spotsafe.resume`` does not restart (another instance owns the run now).
    """


class LeaseTimeout(SpotsafeError, TimeoutError):
    """The store's writer lease stayed with a live holder for longer than the caller would wait."""


class MissingDependency(SpotsafeError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str):  # type: ignore[no-untyped-def]
    """Import an optional dependency, or raise with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{module} is needed for this feature: install spotsafe[{extra}]") from e


class StateError(SpotsafeError, TypeError):
    """A value in the training state cannot be saved without pickle; the message names its key path."""


class StateMismatch(SpotsafeError, KeyError):
    """``restore()`` was given an object the checkpoint holds no state for."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# Volume errors (spotsafe/volume.py): one class per failure kind, each with its own exit status.


class VolumeNotFound(VolumeError, FileNotFoundError):
    """No EBS volume with that id or tag."""


class VolumeAmbiguous(VolumeError, LookupError):
    """Several volumes match the tag and none is clearly the run's."""


class VolumePermissionDenied(VolumeError, PermissionError):
    """The instance role may not make an EC2 call (IAM)."""


class VolumeWrongZone(VolumeError, ValueError):
    """The volume is in another availability zone and moving it was not asked for."""


class VolumeBusy(VolumeError):
    """The volume is still attached to another instance."""


class VolumeTimeout(VolumeError, TimeoutError):
    """An EC2 state change (attach, snapshot, create) did not finish in time."""


class VolumeDeviceNotFound(VolumeError, FileNotFoundError):
    """The volume is attached but its block device never appeared."""


class VolumeNoFilesystem(VolumeError):
    """The device is blank and creating a filesystem was not allowed."""


class VolumeNotBlank(VolumeError):
    """The device holds data that is not a mountable filesystem: it is never formatted."""


class VolumeMountError(VolumeError, OSError):
    """mkfs, mount or umount failed, or the mount point holds another device."""


class VolumeAWSError(VolumeError, OSError):
    """Another EC2 API failure (network, throttling, credentials)."""


# Launch errors (spotsafe/cloud/aws/launch/): `spotsafe launch`, `status`, `down`, `price`.


class LaunchConfigError(SpotsafeError, ValueError):
    """A launch/status/down argument is unusable (the message names the flag and why)."""


class LaunchError(SpotsafeError, RuntimeError):
    """An AWS call of launch/status/down failed, or what it found cannot be used as is."""
