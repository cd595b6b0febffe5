"""A :class:`spotsafe.Run`'s own state in each checkpoint: its key, its format, its check on restore.

Under :data:`RUN_STATE_KEY` a checkpoint written by a Run holds the run's counters and
data position (epoch, batch in the epoch, the epoch's shuffle seed, the sampler
generator's or a StatefulDataLoader's state, the world size) and its history (seconds
trained and interruptions over all launches), as a dict of format
:data:`RUN_STATE_FORMAT`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from spotsafe.errors import SpotsafeError

#: Version of the dict the run stores under ``"spotsafe"`` in each checkpoint.
RUN_STATE_FORMAT = 1
#: Key of the run's own counters in the checkpoint.
RUN_STATE_KEY = "spotsafe"
#: Keys of a Run's checkpoint that ``extra_state`` may not use.
RESERVED_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", RUN_STATE_KEY)


class RunStateError(SpotsafeError, ValueError):
    """The run's own state in a checkpoint is missing or from an unknown format."""


def pop_run_state(restored: dict[str, Any], url: str) -> Mapping[str, Any]:
    """Take the run's own state out of what a restore returned; checked to be a Run's, in a known format."""
    run_state = restored.pop(RUN_STATE_KEY, None)
    if not isinstance(run_state, Mapping):
        raise RunStateError(
            f"{url}: the newest checkpoint has no {RUN_STATE_KEY!r} run state "
            "(written by Checkpointer.save directly, not by spotsafe.Run?)"
        )
    if run_state.get("format") != RUN_STATE_FORMAT:
        raise RunStateError(
            f"{url}: run state format {run_state.get('format')!r} is not {RUN_STATE_FORMAT} (written by a newer spotsafe?)"
        )
    return run_state


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics a checkpoint's metadata keeps: plain values and one-element tensors as numbers."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
    return out
