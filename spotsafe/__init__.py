"""spotsafe: PyTorch training that survives spot and preemptible instance interruptions.

The names below are the public API (see docs/design.md). They are loaded on first
use so that ``import spotsafe`` stays cheap for the CLI and the boot script.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spotsafe.exitcodes import EXIT_FENCED, EXIT_PREEMPTED
from spotsafe.version import __version__

_LAZY = {
    "Run": "spotsafe.run",
    "Checkpointer": "spotsafe.checkpoint.writer",
    "CheckpointInfo": "spotsafe.checkpoint.manifest",
    "RNGState": "spotsafe.state",
    "InterruptionWatcher": "spotsafe.cloud.watcher",
    "Notice": "spotsafe.cloud.notice",
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
    "Store": "spotsafe.storage.base",
    "open_store": "spotsafe.storage.registry",
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
    "Store",
    "StoreError",
    "WriterFenced",
    "__version__",
    "open_store",
]

if TYPE_CHECKING:
    from spotsafe.checkpoint.manifest import CheckpointInfo
    from spotsafe.checkpoint.writer import Checkpointer
    from spotsafe.cloud.notice import Notice
    from spotsafe.cloud.watcher import InterruptionWatcher
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
    from spotsafe.run import Run
    from spotsafe.state import RNGState
    from spotsafe.storage.base import Store
    from spotsafe.storage.registry import open_store


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spotsafe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
