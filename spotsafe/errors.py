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


class MissingDependency(SpotsafeError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str):  # type: ignore[no-untyped-def]
    """Import an optional dependency, or raise with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{module} is needed for this feature: install spotsafe[{extra}]"
        ) from e
