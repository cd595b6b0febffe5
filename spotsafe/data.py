"""Resumable iteration over a training loader: an epoch can restart at any batch.

A resumed run must continue at the very next batch of the same epoch, in the same
shuffle order, without loading the batches it already trained on. How that is done
depends on the loader:

- a map-style :class:`torch.utils.data.DataLoader` (any sampler or batch sampler,
  shuffled or not, ``DistributedSampler``, ``num_workers`` >= 0): the epoch's batches
  of *indices* are planned up front (cheap: no data is loaded), deterministically from
  a per-epoch seed and, when the sampler has its own ``generator``, from that
  generator's state at the start of the epoch. The batches are then fetched by an
  equivalent DataLoader (same dataset, collate_fn, workers, worker_init_fn, pinning)
  driven by the remaining slice of the plan: skipped batches are never fetched.
- torchdata's ``StatefulDataLoader``: its own ``state_dict()`` is saved with each
  checkpoint and loaded on resume.
- a ``range``, list or tuple (of indices, of pre-made batches): sliced at the batch to
  continue from;
- anything else (an ``IterableDataset`` in a plain DataLoader, a generator):
  the consumed batches are iterated again and dropped, with a warning, since nothing
  cheaper can be exact.

The per-epoch seed is either derived from a fixed seed or drawn from torch's global
RNG when the epoch starts (as a plain DataLoader would); it is saved in the
checkpoint, so the replay does not depend on the global RNG's position on resume.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

log = logging.getLogger(__name__)

Kind = Literal["planned", "stateful", "sequence", "replay"]


def derive_epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for ``epoch`` that depends only on (seed, epoch)."""
    digest = hashlib.blake2b(f"spotsafe:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_epoch_seed() -> int:
    """A 63-bit seed drawn from torch's global CPU RNG (reproducible under manual_seed)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class _PlannedSampler(Sampler[Any]):
    """Yields a planned list of indices (or of index lists), set anew each epoch."""

    def __init__(self) -> None:
        self.plan: Sequence[Any] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a plan's 100k small lists are built: each would-be collection walks
    the whole (framework-sized) heap, most of a plan's time otherwise; the lists hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_stateful_loader(loader: object) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _sampler_generator(loader: DataLoader[Any]) -> torch.Generator | None:
    """The generator the index sampler draws from, when it has its own."""
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        generator = getattr(sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


def _split_sampler(loader: DataLoader[Any]) -> Any | None:
    """The loader's ``DistributedSampler`` when it is batched plainly (``batch_size=B``), else None.

    Only then is the global order of an epoch known (the same permutation on every
    world size, dealt round-robin), so an epoch can continue on another world size
    at an exact global sample count.
    """
    from torch.utils.data import BatchSampler, DistributedSampler

    sampler = loader.sampler
    if not isinstance(sampler, (DistributedSampler, ElasticDistributedSampler)):
        return None
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        return None
    return sampler


class ResumableLoader:
    """Iterates one loader an epoch at a time, starting at any batch of the epoch.

    Built by :meth:`spotsafe.Run.batches`; usable alone::

        rl = ResumableLoader(loader)
        for batch in rl.epoch(epoch=3, epoch_seed=s, start=120): ...
        rl.sampler_state   # save it with the checkpoint, pass it back on resume
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.kind: Kind
        self._planned: DataLoader[Any] | None = None
        self._plan_sampler = _PlannedSampler()
        self._generator = torch.Generator()
        #: State of the sampler's own generator at the start of the current epoch.
        self.sampler_state: torch.Tensor | None = None
        if isinstance(loader, DataLoader) and _is_stateful_loader(loader):
            self.kind = "stateful"
        elif isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            self.kind = "planned"
            self._planned = self._build_planned(loader)
        elif isinstance(loader, (range, list, tuple)):
            self.kind = "sequence"
        else:
            self.kind = "replay"

    def _build_planned(self, loader: DataLoader[Any]) -> DataLoader[Any]:
        options: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": self._generator,
        }
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
            options["persistent_workers"] = loader.persistent_workers
        for name in ("pin_memory_device", "in_order"):
            if hasattr(loader, name) and getattr(loader, name) not in ("", True):
                options[name] = getattr(loader, name)
        if loader.batch_sampler is not None:
            return DataLoader(loader.dataset, batch_sampler=self._plan_sampler, **options)
        return DataLoader(loader.dataset, sampler=self._plan_sampler, batch_size=None, **options)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def batch_size(self) -> int | None:
        """Per-rank batch size when an epoch can be re-split at a global sample count, else None.

        True for a map-style DataLoader over a ``DistributedSampler`` (or
        :class:`spotsafe.data.ElasticDistributedSampler`) with ``batch_size=B``.
        """
        loader = self.loader
        if self.kind != "planned" or not isinstance(loader, DataLoader) or _split_sampler(loader) is None:
            return None
        return loader.batch_size

    def _resplit_plan(self, epoch: int, offset: int) -> list[Any]:
        """This rank's batches of ``epoch`` after the first ``offset`` samples of its global order."""
        loader = self.loader
        assert isinstance(loader, DataLoader) and loader.batch_size is not None
        ds = _split_sampler(loader)
        assert ds is not None
        elastic = ElasticDistributedSampler(
            ds.dataset,
            num_replicas=ds.num_replicas,
            rank=ds.rank,
            shuffle=ds.shuffle,
            seed=ds.seed,
            drop_last=ds.drop_last,
        )
        elastic.set_position(epoch, offset)
        indices = list(elastic)
        size = loader.batch_size
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        if loader.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        self.sampler_state = None
        return batches

    # -- planning -----------------------------------------------------------------

    def plan(self, *, epoch: int, epoch_seed: int, sampler_state: torch.Tensor | None = None) -> list[Any]:
        """The epoch's batches of indices (no data is loaded).

        Deterministic in (epoch, epoch_seed, sampler_state); sets :attr:`sampler_state`
        to the sampler generator's state at the start of the epoch (the one given, or
        the live one when starting the epoch fresh).
        """
        loader = self.loader
        assert isinstance(loader, DataLoader)
        for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            set_epoch = getattr(sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)  # DistributedSampler: its shuffle is seeded by (seed, epoch)
        generator = _sampler_generator(loader)
        if generator is not None:
            if sampler_state is not None:
                generator.set_state(sampler_state)
            self.sampler_state = generator.get_state()
        else:
            self.sampler_state = None
        index_sampler: Iterable[Any] = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        # A sampler without its own generator (RandomSampler(generator=None)) draws from
        # the global RNG: give it the epoch's seed and leave the global stream untouched.
        with torch.random.fork_rng(devices=[]), _gc_paused():
            torch.manual_seed(epoch_seed)
            if type(index_sampler) is BatchSampler:
                # torch's own BatchSampler yields consecutive chunks of one pass over its sampler:
                # chunk that pass at C speed (its per-index Python loop is most of a 100k-batch plan).
                flat = list(index_sampler.sampler)
                size = index_sampler.batch_size
                end = len(flat) - len(flat) % size if index_sampler.drop_last else len(flat)
                return [flat[i : i + size] for i in range(0, end, size)]
            return [list(b) if isinstance(b, (list, tuple)) else b for b in index_sampler]

    # -- iteration ----------------------------------------------------------------

    def epoch(
        self,
        *,
        epoch: int,
        epoch_seed: int,
        start: int = 0,
        sampler_state: torch.Tensor | None = None,
        loader_state: Mapping[str, Any] | None = None,
        offset: int = 0,
    ) -> Iterator[Any]:
        """Batches of ``epoch`` from batch number ``start`` (0-based) on.

        ``offset`` (only where :attr:`batch_size` is not None): the epoch was re-split
        after that many samples of its global order (read on another world size);
        ``start`` then counts batches from there.
        """
        if self.kind == "planned":
            assert self._planned is not None
            if offset > 0:
                if self.batch_size is None:
                    raise ValueError(f"{self.loader!r} cannot continue an epoch at a global sample count")
                batches = self._resplit_plan(epoch, offset)
            else:
                batches = self.plan(epoch=epoch, epoch_seed=epoch_seed, sampler_state=sampler_state)
            self._plan_sampler.plan = batches[start:]
            if not self._plan_sampler.plan:
                return iter(())
            self._generator.manual_seed(epoch_seed)  # worker base seeds
            return iter(self._planned)
        if self.kind == "stateful":
            loader: Any = self.loader
            if start > 0 and loader_state is not None:
                loader.load_state_dict(dict(loader_state))
            elif start > 0:
                log.warning("no saved loader state for %r: replaying %d batches", loader, start)
                return itertools.islice(self._fresh_iter(loader, epoch_seed), start, None)
            return self._fresh_iter(loader, epoch_seed)
        if self.kind == "sequence":
            return iter(self.loader[start:])  # type: ignore[index]
        if start > 0:
            log.warning(
                "%r cannot skip to batch %d without loading the batches before it "
                "(not a map-style DataLoader): replaying them",
                type(self.loader).__name__,
                start,
            )
        return itertools.islice(self._fresh_iter(self.loader, epoch_seed), start, None)

    @staticmethod
    def _fresh_iter(loader: Iterable[Any], epoch_seed: int) -> Iterator[Any]:
        # Creating a DataLoader iterator draws its shuffle and worker seeds from the
        # global RNG; draw them from the epoch seed instead so resume replays them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed)
            return iter(loader)

    def state_dict(self) -> dict[str, Any] | None:
        """The stateful loader's own position (StatefulDataLoader), else None."""
        if self.kind == "stateful":
            return dict(self.loader.state_dict())  # type: ignore[attr-defined]
        return None


def resplit(consumed: int, total: int, world_size: int, rank: int, *, drop_last: bool = False) -> list[int]:
    """Positions (into an epoch's global order of ``total`` samples) that ``rank`` still reads.

    Samples are dealt round-robin (position ``consumed + rank + k * world_size``)
    as ``DistributedSampler`` does, so after every rank has read ``n`` samples the
    ones read are exactly positions ``[start, start + n * world_size)``: the
    global count is enough to resume on any world size with no sample lost or
    repeated (except the padding ``DistributedSampler`` also adds to even the
    ranks out, or drops with ``drop_last``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    remaining = max(total - consumed, 0)
    positions = list(range(consumed, consumed + remaining))
    if drop_last:
        usable = (remaining // world_size) * world_size
        positions = positions[:usable]
    elif positions and remaining % world_size:
        pad = world_size - remaining % world_size
        positions += (positions * math.ceil(pad / len(positions)))[:pad]
    return positions[rank::world_size]


class ElasticDistributedSampler:
    """``DistributedSampler`` that can start mid-epoch at a global sample count, on any world size.

    With ``start=0`` it yields exactly what ``torch.utils.data.DistributedSampler``
    yields (same permutation from ``seed + epoch``, same round-robin split, same
    padding), so it is a drop-in. ``set_position(epoch, consumed)`` makes the
    next iteration skip the first ``consumed`` samples of the epoch's global
    order (as many as *all* ranks together consumed) and deal the rest over
    the current world size. The next ``set_epoch`` starts from 0 again.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
            else:
                num_replicas = 1 if num_replicas is None else num_replicas
                rank = 0 if rank is None else rank
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_position(self, epoch: int, consumed: int) -> None:
        """Resume inside ``epoch`` after ``consumed`` samples of it (summed over all ranks)."""
        self.epoch = epoch
        self.start = max(int(consumed), 0)

    def _order(self) -> list[int]:
        import torch

        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        n = len(order)
        if self.drop_last and n % self.num_replicas:
            n = (n // self.num_replicas) * self.num_replicas
            order = order[:n]
        elif not self.drop_last and n % self.num_replicas and self.start == 0:
            # exactly DistributedSampler's padding
            pad = self.num_replicas - n % self.num_replicas
            order = order + (order * math.ceil(pad / n))[:pad]
            n = len(order)
        positions = resplit(self.start, n, self.num_replicas, self.rank, drop_last=self.drop_last)
        return iter([order[p] for p in positions])

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            n = (n // self.num_replicas) * self.num_replicas
        remaining = max(n - self.start, 0)
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)
