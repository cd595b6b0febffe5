"""spotsafe: PyTorch training that survives spot and preemptible instance interruptions.

The names below are the public API (see docs/design.md). They are loaded on first
use so that ``import spotsafe`` stays cheap for the CLI and the boot script.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = _metadata.version("spotsafe")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: Exit status of a process that saved its state on a preemption notice:
#: EX_TEMPFAIL, "state is safe, run me again elsewhere".
EXIT_PREEMPTED = 75
#: Exit status of a ``spotsafe.Run`` whose writer lease was taken over by another instance
#: (EX_NOPERM: "this process may no longer write the store"). ``python -m spotsafe.resume``
#: does not restart it: the run lives on in the instance that took over.
EXIT_FENCED = 77

_LAZY = {
    "Run": "spotsafe.run",
    "Checkpointer": "spotsafe.checkpoint",
    "CheckpointInfo": "spotsafe.checkpoint",
    "RNGState": "spotsafe.state",
    "InterruptionWatcher": "spotsafe.interruption",
    "Notice": "spotsafe.interruption",
    "SpotsafeError": "spotsafe.errors",
    "CheckpointNotFound": "spotsafe.errors",
    "CheckpointCorrupt": "spotsafe.errors",
    "StoreError": "spotsafe.errors",
    "StateError": "spotsafe.errors",
    "StateMismatch": "spotsafe.errors",
    "FormatVersionError": "spotsafe.errors",
    "DistributedError": "spotsafe.errors",
    "WriterFenced": "spotsafe.errors",
    "LeaseTimeout": "spotsafe.errors",
}

__all__ = [
    "EXIT_FENCED",
    "EXIT_PREEMPTED",
    "CheckpointCorrupt",
    "CheckpointInfo",
    "CheckpointNotFound",
    "Checkpointer",
    "DistributedError",
    "FormatVersionError",
    "InterruptionWatcher",
    "LeaseTimeout",
    "Notice",
    "RNGState",
    "Run",
    "SpotsafeError",
    "StateError",
    "StateMismatch",
    "StoreError",
    "WriterFenced",
    "__version__",
]

if TYPE_CHECKING:
    from spotsafe.checkpoint import Checkpointer, CheckpointInfo
    from spotsafe.errors import (
        CheckpointCorrupt,
        CheckpointNotFound,
        DistributedError,
        FormatVersionError,
        LeaseTimeout,
        SpotsafeError,
        StateError,
        StateMismatch,
        StoreError,
        WriterFenced,
    )
    from spotsafe.interruption import InterruptionWatcher, Notice
    from spotsafe.run import Run
    from spotsafe.state import RNGState


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spotsafe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
