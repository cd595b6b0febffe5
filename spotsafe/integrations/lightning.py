"""Lightning: ``L.Trainer(..., callbacks=[SpotsafeCallback()])`` and an unchanged ``trainer.fit(...)``.

::

    import lightning as L
    from spotsafe.integrations.lightning import SpotsafeCallback

    trainer = L.Trainer(max_epochs=10, callbacks=[SpotsafeCallback()])   # store: SPOTSAFE_STORE or the first argument
    trainer.fit(model, train_loader)

At fit start (every rank) the callback restores the newest intact checkpoint of the
store: the module's weights, optimizers, LR schedulers, precision plugin state,
callbacks' states, the datamodule's state, the loops' progress (epoch, global step,
batch in the epoch), every RNG, and the training dataloader's position. The epoch
continues at the next batch in the same shuffle order; for a map-style DataLoader
(also with Lightning's DistributedSampler) the consumed batches are not loaded again.

After every optimizer step it may save (``every_steps``/``every_seconds``, default
every 600 s); on a notice (AWS/GCP/Azure metadata, SIGTERM) seen by any rank, every
rank saves at one agreed step, waits until the checkpoint is durable and the process
exits 75 (``spotsafe.EXIT_PREEMPTED``). Lightning's own SIGTERM handling (which
raises on rank 0's say-so from inside a signal handler) is replaced while fitting,
when spotsafe watches SIGTERM (the default).
At the end of ``fit`` the run gets a final checkpoint and is marked complete.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spotsafe.integrations.core import EpochLoader, Session, check_store, require

require("lightning", "lightning")

import lightning.pytorch as pl  # noqa: E402 - after the install hint above

if TYPE_CHECKING:
    from spotsafe.storage.base import Store

log = logging.getLogger(__name__)

__all__ = ["SpotsafeCallback"]

#: Key of the Lightning state inside a spotsafe checkpoint.
STATE_KEY = "lightning"
# Lightning's checkpoint keys that hold constructor arguments (arbitrary objects): the
# live module was built by the same script, so they are not needed to restore it.
_HPARAM_KEYS = (
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hparams_type",
)


def _loop_state(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    loops = ckpt.get("loops")
    fit = loops.get("fit_loop") if isinstance(loops, Mapping) else None
    state = fit.get("state_dict") if isinstance(fit, Mapping) else None
    return state if isinstance(state, dict) else None


class _TrainerState:
    """The trainer's checkpoint (Lightning's own dict, minus hyperparameters) as a stateful object."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        ckpt = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        for key in _HPARAM_KEYS:
            ckpt.pop(key, None)
        return ckpt

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded = dict(state)


class SpotsafeCallback(pl.Callback):
    """Checkpoint a Lightning run to a spotsafe store; resume it exactly; save and exit 75 on a notice.

    ``store``: a local path, an fsspec URL (``s3://...``) or a :class:`spotsafe.storage.base.Store`;
    None takes ``SPOTSAFE_STORE`` (set by ``python -m spotsafe.resume --store``).
    ``every_steps``/``every_seconds``: periodic saves (default every 600 s), counted in
    optimizer steps (Lightning's ``global_step``). ``watch``: True watches AWS, GCP,
    Azure and SIGTERM (``SPOTSAFE_SOURCES`` overrides), False nothing, or pass an
    :class:`spotsafe.InterruptionWatcher`. ``seed``: per-epoch shuffle seeds derived
    from it (None: drawn from torch's global RNG when an epoch starts, so
    ``L.seed_everything`` keeps runs reproducible).

    :attr:`run` is the :class:`spotsafe.Run` underneath (from fit start on).
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
        seed: int | None = None,
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
        self.seed = seed
        self.session: Session | None = None
        self._state: _TrainerState | None = None
        self._loaders: list[EpochLoader] = []
        self._data_states: list[dict[str, Any]] = []
        self._last_step = -1
        self._sigterm: Any = None

    @property
    def run(self) -> Any:
        """The :class:`spotsafe.Run` of the current fit (None before fit start)."""
        return self.session.run if self.session is not None else None

    # -- fit start: restore ----------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:  # a second fit() with the same callback
            self.session.close()
        self._state = _TrainerState(trainer)
        self.session = Session(self.store, self._state, key=STATE_KEY, **self._options)
        watcher = self.session.run.watcher
        # The watcher's SIGTERM handler, to keep in place of Lightning's (None: SIGTERM is not spotsafe's).
        self._sigterm = (
            signal.getsignal(signal.SIGTERM) if watcher is not None and "signal" in watcher.sources else None
        )
        self._last_step = trainer.global_step
        loaded = self._state.loaded
        self._state.loaded = None
        if loaded is None:
            return
        loop_state = _loop_state(loaded)
        # The position lives in the loop state under Lightning's own key; it is applied to
        # the wrapped loaders at train start, not to the raw ones Lightning restores into.
        self._data_states = list(loop_state.pop("combined_loader", None) or []) if loop_state is not None else []
        connector = trainer._checkpoint_connector
        connector._loaded_checkpoint = loaded
        if not trainer.strategy.restore_checkpoint_after_setup:
            connector.restore_model()
            connector.restore_datamodule()
            connector.restore_callbacks()
        # Lightning itself restores the rest next (precision plugin, loops, optimizers,
        # schedulers: restore_training_state), then releases the checkpoint (resume_end).
        self._last_step = int(loaded.get("global_step", trainer.global_step))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is None:
            return
        # Lightning composes its SIGTERM notifier with ours after on_fit_start; keep ours alone:
        # the notice is agreed across ranks at a step, never acted on inside a signal handler.
        if self._sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)
        self._wrap_loaders(trainer)
        # Last: Lightning's setup drew from the RNGs since the run restored them.
        self.session.restore_rng()
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if self._loaders and fetcher is not None:
            iter(fetcher)  # the epoch's iterator again, from the wrapped loaders (at the saved batch)

    def _wrap_loaders(self, trainer: pl.Trainer) -> None:
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        if combined is None:
            return
        flat = list(combined.flattened)
        if any(callable(getattr(dl, "state_dict", None)) for dl in flat):
            # Stateful loaders (torchdata's StatefulDataLoader): Lightning saves and restores their state itself.
            self._loaders = []
            return

        def epoch() -> int:
            return int(trainer.current_epoch)

        self._loaders = [EpochLoader(dl, epoch, seed=self.seed) for dl in flat]
        states = self._data_states
        self._data_states = []
        if states and len(states) != len(self._loaders):
            log.warning(
                "spotsafe: the checkpoint has %d training loader positions, this fit has %d loaders: "
                "starting their epoch at batch 0",
                len(states),
                len(self._loaders),
            )
            states = []
        if states:
            for loader, state in zip(self._loaders, states, strict=True):
                loader.load_state_dict(state)
        combined.flattened = self._loaders

    # -- every step: save, notice ------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        session = self.session
        step = trainer.global_step
        if session is None or step == self._last_step:
            return  # no optimizer step at this batch (gradient accumulation): nothing consistent to save
        self._last_step = step
        for loader in self._loaders:
            loader.trained = batch_idx + 1
        session.step(step, epoch=trainer.current_epoch, batch=batch_idx + 1)

    # -- the end -----------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self.session
        if session is None:
            return
        self.session = None
        session.finish(epoch=trainer.current_epoch)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()  # an in-flight save lands; the watcher stops

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()
