"""Accelerate: :class:`AcceleratedRun`, a :class:`spotsafe.Run` that takes its state from an ``Accelerator``.

An Accelerate script owns its loop, so the addition is the one :class:`spotsafe.Run`
asks of any loop, built from the accelerator instead of from the objects::

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    run = AcceleratedRun(accelerator, every_steps=500)        # restores the newest intact checkpoint
    for epoch in run.epochs(10):                              # starts at the restored epoch
        for batch in run.batches(train_loader):               # at the restored batch; skipped ones are not loaded
            ...
            accelerator.backward(loss); optimizer.step(); scheduler.step(); optimizer.zero_grad()
            run.step()                                        # may save; on a notice: save, exit 75
    run.finish()

A checkpoint holds what ``accelerator.save_state`` would (every prepared model,
optimizer and scheduler, the grad scaler, every object passed to
``accelerator.register_for_checkpointing``) plus every RNG and the data position,
through spotsafe (checksummed, manifest-last, no pickle). Under ``accelerate launch``
/ torchrun the saves are collective and a notice on any rank is agreed by all at one
step, as for :class:`spotsafe.Run`.

``run.batches(loader)`` on a prepared loader plans the epoch's index batches from the
loader's own sampler (``accelerate``'s per-process sharding included) and fetches only
the remaining ones, then places them on the accelerator's device as the prepared loader
would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from spotsafe.integrations.core import check_store, require
from spotsafe.run import Run

require("accelerate", "accelerate")

from accelerate.utils import send_to_device  # noqa: E402 - after the install hint above

if TYPE_CHECKING:
    from spotsafe.storage.base import Store

__all__ = ["AcceleratedRun"]

#: Key of the accelerator's objects inside a spotsafe checkpoint.
STATE_KEY = "accelerate"


class _AcceleratorState:
    """Every object the accelerator checkpoints, as one stateful object."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def _groups(self) -> dict[str, list[Any]]:
        acc = self.accelerator
        return {
            "models": [acc.unwrap_model(m) for m in acc._models],
            "optimizers": list(acc._optimizers),
            "schedulers": list(acc._schedulers),
            "custom": list(acc._custom_objects),
        }

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: [o.state_dict() for o in objs] for name, objs in self._groups().items()}
        scaler = getattr(self.accelerator, "scaler", None)
        out["scaler"] = scaler.state_dict() if scaler is not None else None
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, objs in self._groups().items():
            saved = state.get(name) or []
            if len(saved) != len(objs):
                raise ValueError(
                    f"the checkpoint holds {len(saved)} {name}, the accelerator has {len(objs)} prepared: "
                    "prepare (and register_for_checkpointing) the same objects before building AcceleratedRun"
                )
            for obj, obj_state in zip(objs, saved, strict=True):
                obj.load_state_dict(obj_state)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])


class AcceleratedRun(Run):
    """A :class:`spotsafe.Run` over everything ``accelerator`` prepared (build it after ``prepare``).

    ``store`` and the keyword arguments are :class:`spotsafe.Run`'s (``every_steps``,
    ``every_seconds``, ``keep_last``, ``watch``, ``seed``, ...; not ``model``/``optimizer``/
    ``scheduler``/``scaler``, which come from the accelerator). Under several processes
    pass ``seed`` (or seed every process alike) so that every rank plans the same shuffle.
    """

    def __init__(
        self, accelerator: Any, store: str | os.PathLike[str] | Store | None = None, **run_options: Any
    ) -> None:
        check_store(store, "AcceleratedRun")
        taken = sorted(set(run_options) & {"model", "optimizer", "scheduler", "scaler"})
        if taken:
            raise TypeError(f"AcceleratedRun takes {taken} from the accelerator; do not pass them")
        extra = dict(run_options.pop("extra_state", None) or {})
        if STATE_KEY in extra:
            raise ValueError(f"extra_state key {STATE_KEY!r} is reserved by AcceleratedRun")
        extra[STATE_KEY] = _AcceleratorState(accelerator)
        self.accelerator = accelerator
        super().__init__(store, extra_state=extra, **run_options)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The epoch's batches from the restored batch on, on the device the prepared ``loader`` puts them."""
        base = getattr(loader, "base_dataloader", None)
        if base is None:  # not a prepared loader
            yield from super().batches(loader)
            return
        device = getattr(loader, "device", None)
        for batch in super().batches(base):
            yield send_to_device(batch, device) if device is not None else batch
