"""spotsafe: PyTorch training that survives spot and preemptible instance interruptions.

The names below are the public API (see docs/design.md). They are loaded on first
use so that ``import spotsafe`` stays cheap for the CLI and the boot script.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Exit status of a process that saved its state on a preemption notice:
#: EX_TEMPFAIL, "state is safe, run me again elsewhere".
EXIT_PREEMPTED = 75

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
}

__all__ = ["EXIT_PREEMPTED", "__version__", *_LAZY]

if TYPE_CHECKING:
    from spotsafe.checkpoint import CheckpointInfo, Checkpointer
    from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, SpotsafeError, StoreError
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
