"""Sharded (FSDP2 / DTensor) state: detected, and wrapped so it is saved through DCP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def is_sharded(module: Any) -> bool:
    """True when ``module`` holds DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)."""
    from torch.distributed.tensor import DTensor

    params = getattr(module, "parameters", None)
    return callable(params) and any(isinstance(p, DTensor) for p in params())


class ShardedState:
    """A model (and its optimizer) whose state is sharded: saved and loaded through DCP.

    ``state_dict()``/``load_state_dict()`` go through
    ``torch.distributed.checkpoint.state_dict.get_state_dict``/``set_state_dict``
    (FQN-keyed, DTensor shards). The Checkpointer writes an object of this type
    with :func:`save_sharded` into ``<checkpoint>/dcp/`` instead of its own files;
    ``spotsafe.Run`` wraps an FSDP model and its optimizer in one automatically.
    """

    def __init__(self, model: Any, optimizer: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
