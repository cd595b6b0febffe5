"""What the framework integrations share: a :class:`spotsafe.Run` driven by a framework's hooks.

A framework owns the training loop, so an integration cannot wrap it the way
:class:`spotsafe.Run` wraps a hand-written one. Instead it hands the run one
*stateful* object (``state_dict()``/``load_state_dict()``) that captures
everything the framework needs to continue (weights, optimizers, schedulers, loop
progress, callbacks, data position), and calls :meth:`Session.step` after every
optimizer step. The run does the rest exactly as for a hand-written loop: periodic
saves, the notice agreed by every rank at one step, the durable notice save, exit
75, the collective commit under torchrun, falling back past a damaged checkpoint.

RNGs: the run restores them when it is built, but a framework draws from them
between that moment and the first training step (dataloader iterators, wrapping,
its own setup); :meth:`Session.restore_rng` puts the saved state back at the
last moment before the first resumed step.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

import torch

from spotsafe.data import ResumableLoader, derive_epoch_seed, draw_epoch_seed
from spotsafe.run import Run
from spotsafe.settings import Settings
from spotsafe.state import RNGState

__all__ = ["EpochLoader", "Session", "check_store", "require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise ImportError with the install hint for ``spotsafe[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"spotsafe.integrations.{extra} needs {module!r}, which is not installed: "
            f"pip install 'spotsafe[{extra}]' ({e})"
        ) from e


def check_store(store: str | os.PathLike[str] | Any | None, where: str) -> None:
    """Fail at construction, not at fit start, when no store is given and ``SPOTSAFE_STORE`` is unset."""
    if store is None and not Settings.from_env().store:
        raise ValueError(
            f"{where}: no store given and SPOTSAFE_STORE is not set; pass a path or URL "
            "(e.g. SpotsafeCallback('s3://bucket/runs/x')) or run under `python -m spotsafe.resume --store URL`"
        )


class Session:
    """One :class:`spotsafe.Run` whose state is ``state`` (saved under ``key``) and whose steps a framework counts.

    Built at the framework's "training starts" hook on every rank (under torchrun the
    run's collectives need every rank); it restores the newest intact checkpoint into
    ``state`` and the RNGs at once.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Any | None,
        state: Any,
        *,
        key: str,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int = 3,
        watch: Any = True,
        storage_options: Mapping[str, Any] | None = None,
        async_: bool = True,
        agree_every: int | str = "auto",
        map_location: Any = None,
    ) -> None:
        self.run = Run(
            store,
            extra_state={key: state},
            every_steps=every_steps,
            every_seconds=every_seconds,
            keep_last=keep_last,
            watch=watch,
            storage_options=storage_options,
            async_=async_,
            agree_every=agree_every,
            map_location=map_location,
        )
        #: The RNG states the run restored (None on a fresh start); see :meth:`restore_rng`.
        self._rng: dict[str, Any] | None = RNGState().state_dict() if self.resumed else None

    @property
    def resumed(self) -> bool:
        """True when the run restored a checkpoint."""
        return self.run.resumed_from is not None

    def restore_rng(self) -> None:
        """Put back the RNG states the checkpoint held (a no-op on a fresh start); once."""
        if self._rng is not None:
            RNGState().load_state_dict(self._rng)
            self._rng = None

    def step(self, step: int, *, epoch: int, batch: int) -> None:
        """The framework finished optimizer step number ``step`` (1-based, global) at ``batch`` of ``epoch``.

        May save; on an agreed final notice it saves, waits until durable and exits 75.
        """
        run = self.run
        run.step_count = step - 1  # Run.step() counts it: checkpoints are named by the framework's global step
        run.epoch = epoch
        run.batch = batch
        run.step()

    def finish(self, *, epoch: int) -> bool:
        """Final checkpoint, the run marked complete (a no-op after a notice stopped it)."""
        run = self.run
        run.epoch = epoch
        return run.finish()

    def close(self) -> None:
        """Wait for in-flight saves and release the store and the watcher."""
        self.run.close()


class EpochLoader:
    """A training DataLoader that starts an epoch at any batch without loading the batches before it.

    Iterating it starts the epoch ``epoch()`` returns: from batch 0 with a fresh
    epoch seed (drawn from torch's global RNG, or derived from ``seed``), or, once
    after :meth:`load_state_dict`, from the saved batch with the saved seed and
    sampler state (:class:`spotsafe.data.ResumableLoader`: map-style loaders plan
    the epoch's index batches and fetch only the remaining ones; other iterables
    replay the consumed batches). :attr:`trained` is set by the integration to the
    number of batches of the epoch trained on; it is the resume point.
    """

    def __init__(self, loader: Iterable[Any], epoch: Callable[[], int], *, seed: int | None = None) -> None:
        self.loader = loader
        self._epoch = epoch
        self.seed = seed
        self._rl = ResumableLoader(loader)
        self._pending: dict[str, Any] | None = None
        self.epoch: int | None = None
        self.epoch_seed: int | None = None
        self.sampler_state: torch.Tensor | None = None
        #: Batches of the current epoch trained on (the position a checkpoint records).
        self.trained = 0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch()
        pending, self._pending = self._pending, None
        start = 0
        sampler_state: torch.Tensor | None = None
        if pending is not None and pending.get("epoch") == epoch and pending.get("epoch_seed") is not None:
            start = int(pending["batch"])
            epoch_seed = int(pending["epoch_seed"])
            sampler_state = pending.get("sampler_state")
        else:
            epoch_seed = derive_epoch_seed(self.seed, epoch) if self.seed is not None else draw_epoch_seed()
        iterator = self._rl.epoch(epoch=epoch, epoch_seed=epoch_seed, start=start, sampler_state=sampler_state)
        self.epoch, self.epoch_seed, self.sampler_state = epoch, epoch_seed, self._rl.sampler_state
        self.trained = start
        return iterator

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, batches trained, the epoch's seed and sampler generator state."""
        return {
            "format": 1,
            "epoch": self.epoch,
            "batch": self.trained,
            "epoch_seed": self.epoch_seed,
            "sampler_state": self.sampler_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next :meth:`__iter__` continues at the saved position (if it starts the saved epoch)."""
        if state.get("format") != 1:
            raise ValueError(
                f"EpochLoader state format {state.get('format')!r} is not 1 (written by a newer spotsafe?)"
            )
        self._pending = dict(state)
