"""spotsafe.data: an epoch restarts at any batch, in the same order, without loading skipped batches."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from spotsafe.data import ResumableLoader, derive_epoch_seed, draw_epoch_seed


class Counting(Dataset[int]):
    """Item i is i; every __getitem__ is counted (across worker processes too)."""

    def __init__(self, n: int, counter: Any = None) -> None:
        self.n = n
        self.counter = counter if counter is not None else multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        with self.counter.get_lock():
            self.counter.value += 1
        return i


def flat(batches: list[Any]) -> list[int]:
    out: list[int] = []
    for b in batches:
        out.extend(torch.as_tensor(b).reshape(-1).tolist())
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_skips_without_loading(num_workers: int) -> None:
    ds = Counting(40)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=num_workers)
    rl = ResumableLoader(loader)
    assert rl.kind == "planned"
    full = [b.tolist() for b in rl.epoch(epoch=2, epoch_seed=1234)]
    assert sorted(flat(full)) == list(range(40))
    assert ds.counter.value == 40

    ds.counter.value = 0
    rest = [b.tolist() for b in ResumableLoader(loader).epoch(epoch=2, epoch_seed=1234, start=7)]
    assert rest == full[7:]
    # only the 3 remaining batches of 4 were loaded
    assert ds.counter.value == 12


def test_order_depends_on_epoch_seed_and_global_rng_is_untouched() -> None:
    loader = DataLoader(Counting(30), batch_size=5, shuffle=True)
    rl = ResumableLoader(loader)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = flat(list(rl.epoch(epoch=0, epoch_seed=1)))
    b = flat(list(rl.epoch(epoch=0, epoch_seed=2)))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a != b
    assert a == flat(list(rl.epoch(epoch=0, epoch_seed=1)))


def test_sampler_with_own_generator_replays_from_saved_state() -> None:
    ds = Counting(24)
    gen = torch.Generator().manual_seed(7)
    loader = DataLoader(ds, batch_size=3, sampler=RandomSampler(ds, generator=gen))
    rl = ResumableLoader(loader)
    epoch0 = flat(list(rl.epoch(epoch=0, epoch_seed=5)))
    saved = rl.sampler_state
    assert saved is not None
    epoch1 = flat(list(rl.epoch(epoch=1, epoch_seed=6)))
    assert epoch0 != epoch1  # the user's generator advanced between epochs
    # A new process: fresh generator with a different state; the saved state replays epoch 0.
    gen2 = torch.Generator().manual_seed(999)
    loader2 = DataLoader(ds, batch_size=3, sampler=RandomSampler(ds, generator=gen2))
    tail = flat(list(ResumableLoader(loader2).epoch(epoch=0, epoch_seed=5, start=5, sampler_state=saved)))
    assert tail == epoch0[15:]
    # ... and leaves the generator where the uninterrupted run had it: epoch 1 matches too
    assert flat(list(ResumableLoader(loader2).epoch(epoch=1, epoch_seed=6))) == epoch1


def test_distributed_sampler_set_epoch() -> None:
    ds = Counting(20)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=2, sampler=sampler)
    rl = ResumableLoader(loader)
    e0 = flat(list(rl.epoch(epoch=0, epoch_seed=1)))
    e1 = flat(list(rl.epoch(epoch=1, epoch_seed=1)))
    assert len(e0) == 10
    assert e0 != e1
    sampler.set_epoch(0)
    assert e0 == list(sampler)
    assert flat(list(rl.epoch(epoch=1, epoch_seed=1, start=3))) == e1[6:]


def test_no_auto_batching_and_drop_last() -> None:
    ds = Counting(10)
    rl = ResumableLoader(DataLoader(ds, batch_size=None, shuffle=True))
    full = [int(x) for x in rl.epoch(epoch=0, epoch_seed=9)]
    assert sorted(full) == list(range(10))
    assert [int(x) for x in rl.epoch(epoch=0, epoch_seed=9, start=4)] == full[4:]
    rl = ResumableLoader(DataLoader(ds, batch_size=3, drop_last=True))
    assert [b.tolist() for b in rl.epoch(epoch=0, epoch_seed=0, start=1)] == [[3, 4, 5], [6, 7, 8]]
    assert list(rl.epoch(epoch=0, epoch_seed=0, start=3)) == []


class Stream(IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(12))


def test_iterable_dataset_is_replayed() -> None:
    rl = ResumableLoader(DataLoader(Stream(), batch_size=4))
    assert rl.kind == "replay"
    assert [b.tolist() for b in rl.epoch(epoch=0, epoch_seed=0, start=2)] == [[8, 9, 10, 11]]
    assert list(ResumableLoader([1, 2, 3]).epoch(epoch=0, epoch_seed=0, start=1)) == [2, 3]


def test_stateful_dataloader() -> None:
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = Counting(30)
    loader = sdl.StatefulDataLoader(ds, batch_size=3, shuffle=True)
    rl = ResumableLoader(loader)
    assert rl.kind == "stateful"
    it = rl.epoch(epoch=0, epoch_seed=11)
    head = [next(it).tolist() for _ in range(4)]
    state = rl.state_dict()
    tail = [b.tolist() for b in it]
    ds.counter.value = 0
    loader2 = sdl.StatefulDataLoader(ds, batch_size=3, shuffle=True)
    resumed = [b.tolist() for b in ResumableLoader(loader2).epoch(epoch=0, epoch_seed=11, start=4, loader_state=state)]
    assert resumed == tail
    assert ds.counter.value == 18
    assert sorted(flat(head + tail)) == list(range(30))


def test_seeds() -> None:
    assert derive_epoch_seed(1, 0) == derive_epoch_seed(1, 0)
    assert derive_epoch_seed(1, 0) != derive_epoch_seed(1, 1)
    assert 0 <= derive_epoch_seed(2**70, 5) < 2**63
    torch.manual_seed(3)
    a = draw_epoch_seed()
    torch.manual_seed(3)
    assert draw_epoch_seed() == a


@pytest.mark.parametrize(("old", "new", "batches"), [(2, 3, 3), (3, 2, 1), (1, 2, 5), (3, 4, 2), (2, 2, 3)])
def test_an_epoch_resplit_at_a_global_sample_count_reads_every_sample_once(old: int, new: int, batches: int) -> None:
    """``offset``: the epoch continues on another world size after exactly the samples read on the old one."""
    data = list(range(48))

    def loader(world: int, rank: int) -> DataLoader[Any]:
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, world, rank, shuffle=True, seed=3))  # type: ignore[arg-type]

    before = [
        i
        for r in range(old)
        for b in list(ResumableLoader(loader(old, r)).epoch(epoch=5, epoch_seed=0))[:batches]
        for i in b.tolist()
    ]
    offset = batches * old * 4
    rls = [ResumableLoader(loader(new, r)) for r in range(new)]
    assert {rl.batch_size for rl in rls} == {4}
    after = [i for rl in rls for b in rl.epoch(epoch=5, epoch_seed=0, offset=offset) for i in b.tolist()]
    assert sorted(before + after) == data
    # a second interruption inside the re-split epoch: start counts batches from the offset
    rest = [i for rl in rls for b in rl.epoch(epoch=5, epoch_seed=0, offset=offset, start=1) for i in b.tolist()]
    first = [i for rl in rls for b in list(rl.epoch(epoch=5, epoch_seed=0, offset=offset))[:1] for i in b.tolist()]
    assert sorted(before + first + rest) == data


def test_an_offset_needs_a_distributed_sampler() -> None:
    rl = ResumableLoader(DataLoader(list(range(8)), batch_size=2, shuffle=True))
    assert rl.batch_size is None
    with pytest.raises(ValueError, match="cannot continue an epoch at a global sample count"):
        rl.epoch(epoch=0, epoch_seed=1, offset=4)
