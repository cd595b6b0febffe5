"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[SpotsafeCallback()])`` and an unchanged ``trainer.train()``.

::

    from transformers import Trainer
    from spotsafe.integrations.transformers import SpotsafeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SpotsafeCallback()])
    trainer.train()

``trainer.train()`` (with no ``resume_from_checkpoint`` of its own) first restores the
newest intact checkpoint of the store: the model's weights, the optimizer, the LR
scheduler, the AMP grad scaler, the ``TrainerState`` (global step, epoch, log
history, stateful callbacks such as early stopping) and every rank's RNGs. The
Trainer's own resume logic then continues the epoch at the next batch: it skips the
consumed batches at the sampler level (``accelerate.skip_first_batches``; no data is
loaded for a map-style dataset) in the same shuffle order (Trainer's seedable
sampler), and puts the RNGs back before the first resumed step.

After every optimizer step it may save (``every_steps``/``every_seconds``, default
every 600 s); on a notice (AWS/GCP/Azure metadata, SIGTERM) seen by any rank, every
rank saves at one agreed step, waits until the checkpoint is durable and the process
exits 75 (``spotsafe.EXIT_PREEMPTED``). At the end of ``train()`` the run gets a
final checkpoint and is marked complete.

How it reaches the Trainer: a callback is not given the Trainer, so at
``on_init_end`` the callback finds the ``Trainer`` whose ``__init__`` is calling it
and wraps that instance's ``train`` (the class is untouched). During that ``train()``
the Trainer's checkpoint readers (``_load_from_checkpoint``,
``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``) read from
the restored spotsafe checkpoint instead of files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from spotsafe.integrations.core import Session, check_store, require

require("transformers", "transformers")

import transformers  # noqa: E402 - after the install hint above
from transformers.trainer_callback import ExportableState, TrainerCallback  # noqa: E402

if TYPE_CHECKING:
    from spotsafe.storage.base import Store

log = logging.getLogger(__name__)

__all__ = ["SpotsafeCallback"]

#: Key of the Trainer's state inside a spotsafe checkpoint.
STATE_KEY = "transformers"
_TRAINER_STATE_NAME = "trainer_state.json"
_READERS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler", "_load_rng_state")


class _TrainerState:
    """What the Trainer's own checkpoint holds, as a stateful object (tensors through spotsafe, no pickle)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer  # a transformers.Trainer, typed loosely (its attributes are Optional)
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        # As Trainer._save_checkpoint does: the stateful callbacks' and the control's state, now.
        for cb in [cb for cb in [*t.callback_handler.callbacks, t.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(t.state.stateful_callbacks.get(name), list):
                t.state.stateful_callbacks[name].append(cb.state())
            else:
                t.state.stateful_callbacks[name] = cb.state()
        out: dict[str, Any] = {
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "trainer_state": json.dumps(dataclasses.asdict(t.state), sort_keys=True),
        }
        if t.lr_scheduler is not None:
            out["scheduler"] = t.lr_scheduler.state_dict()
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None:
            out["scaler"] = scaler.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded = dict(state)


def _find_trainer(callback: TrainerCallback) -> Any:
    """The Trainer whose ``__init__`` is calling ``callback.on_init_end`` (walks up the stack), or None."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if isinstance(obj, transformers.Trainer) and callback in getattr(handler, "callbacks", ()):
            return obj
        frame = frame.f_back
    return None


class SpotsafeCallback(TrainerCallback):
    """Checkpoint a Hugging Face Trainer run to a spotsafe store; resume it exactly; save and exit 75 on a notice.

    ``store``: a local path, an fsspec URL (``s3://...``) or a :class:`spotsafe.storage.base.Store`;
    None takes ``SPOTSAFE_STORE`` (set by ``python -m spotsafe.resume --store``).
    ``every_steps``/``every_seconds``: periodic saves (default every 600 s), counted in
    optimizer steps (``state.global_step``). ``watch``: True watches AWS, GCP, Azure
    and SIGTERM (``SPOTSAFE_SOURCES`` overrides), False nothing, or pass an
    :class:`spotsafe.InterruptionWatcher`.

    Pass it in ``Trainer(callbacks=[...])`` (not ``add_callback`` after construction):
    it attaches to the Trainer while the Trainer is built. :attr:`run` is the
    :class:`spotsafe.Run` underneath (during ``train()``).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store | None = None,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int = 3,
        watch: Any = True,
        storage_options: Mapping[str, Any] | None = None,
        async_: bool = True,
        agree_every: int | str = "auto",
    ) -> None:
        check_store(store, "SpotsafeCallback")
        self.store = store
        self._options: dict[str, Any] = {
            "every_steps": every_steps,
            "every_seconds": every_seconds,
            "keep_last": keep_last,
            "watch": watch,
            "storage_options": storage_options,
            "async_": async_,
            "agree_every": agree_every,
        }
        self.trainer: Any = None  # the transformers.Trainer it is attached to
        self.session: Session | None = None
        self._loaded: dict[str, Any] | None = None
        self._marker: str | None = None

    @property
    def run(self) -> Any:
        """The :class:`spotsafe.Run` of the current ``train()`` (None outside it)."""
        return self.session.run if self.session is not None else None

    # -- attaching -----------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _find_trainer(self)
        if trainer is None:
            raise RuntimeError(
                "spotsafe SpotsafeCallback: could not find the Trainer being built; pass the callback as "
                "Trainer(..., callbacks=[SpotsafeCallback()])"
            )
        self.trainer = trainer
        original = trainer.train
        trainer.train = functools.wraps(original)(functools.partial(self._train, original))

    def _train(
        self, original: Callable[..., Any], resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        trainer = self.trainer
        assert trainer is not None
        if self.session is not None:
            self.session.close()
        adapter = _TrainerState(trainer)
        self.session = Session(self.store, adapter, key=STATE_KEY, **self._options)
        loaded, adapter.loaded = adapter.loaded, None
        if resume_from_checkpoint not in (None, False):
            log.warning(
                "spotsafe: train(resume_from_checkpoint=%r) given: resuming from it, not from %s",
                resume_from_checkpoint,
                self.session.run.store.url,
            )
            loaded = None
        if loaded is None:
            try:
                return original(resume_from_checkpoint, *args, **kwargs)
            finally:
                self._close()
        # The Trainer's own resume path, reading from the restored checkpoint: it computes the
        # epoch and the batch to continue at from the TrainerState and skips at the sampler level.
        self._loaded = loaded
        marker = self._marker = tempfile.mkdtemp(prefix="spotsafe-hf-")
        try:
            with open(os.path.join(marker, _TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                f.write(str(loaded["trainer_state"]))
            for name in _READERS:
                setattr(trainer, name, getattr(self, name))
            return original(marker, *args, **kwargs)
        finally:
            for name in _READERS:
                trainer.__dict__.pop(name, None)
            self._drop_marker()
            self._loaded = None
            self._close()

    def _drop_marker(self) -> None:
        marker, self._marker = self._marker, None
        if marker is not None:
            shutil.rmtree(marker, ignore_errors=True)

    def _close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    # -- the Trainer's checkpoint readers, during a resumed train() ----------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        assert self.trainer is not None and self._loaded is not None
        (model if model is not None else self.trainer.model).load_state_dict(self._loaded["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        t = self.trainer
        assert t is not None and self._loaded is not None
        self._drop_marker()  # the Trainer has read the TrainerState from it: nothing reads it again
        t.optimizer.load_state_dict(self._loaded["optimizer"])
        if t.lr_scheduler is not None and "scheduler" in self._loaded:
            t.lr_scheduler.load_state_dict(self._loaded["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        assert self.trainer is not None and self._loaded is not None
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None and "scaler" in self._loaded:
            scaler.load_state_dict(self._loaded["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self.session is not None:
            self.session.restore_rng()

    # -- every step: save, notice --------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session is None:
            raise RuntimeError(
                "spotsafe SpotsafeCallback: train() started without it (added with add_callback after the "
                "Trainer was built?); pass it as Trainer(..., callbacks=[SpotsafeCallback()])"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self.session
        if session is None:
            return
        epoch = float(state.epoch or 0.0)
        loader = kwargs.get("train_dataloader")
        try:
            per_epoch = len(loader) if loader is not None else 0
        except TypeError:
            per_epoch = 0
        batch = round((epoch - math.floor(epoch)) * per_epoch)
        session.step(int(state.global_step), epoch=math.floor(epoch), batch=batch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.finish(epoch=math.floor(float(state.epoch or 0.0)))
