"""spotsafe.Run: exact resume after interruptions, notices, rebalance, finish."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import spotsafe
from spotsafe import EXIT_PREEMPTED, Run
from spotsafe.checkpoint.writer import Checkpointer
from tests.helpers import quiet_watcher, wait_until

N_ITEMS, BATCH = 60, 8  # 8 batches an epoch, the last one short
PER_EPOCH = 8


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(42)
    return TensorDataset(torch.randn(N_ITEMS, 6, generator=g), torch.randint(0, 3, (N_ITEMS,), generator=g))


def make_model(init_seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    return model, opt, sched


def train(
    store: Path,
    *,
    epochs: int = 3,
    interrupt_at: Iterable[int] = (),
    interrupt_after_epoch: Iterable[int] = (),
    every_steps: int | None = 5,
    loader_factory: Any = None,
    async_: bool = True,
    on_segment: Any = None,
) -> tuple[nn.Module, torch.optim.Optimizer, list[int]]:
    """Train to the end, restarting with fresh objects after every notice; the final objects."""
    pending = set(interrupt_at)
    pending_epochs = set(interrupt_after_epoch)
    loader = loader_factory() if loader_factory else DataLoader(dataset(), batch_size=BATCH, shuffle=True)
    resumed_at: list[int] = []
    for segment in range(len(pending) + len(pending_epochs) + 1):
        if on_segment is not None:
            on_segment(segment)
        # A new "process": objects initialised differently, global RNG elsewhere.
        model, opt, sched = make_model(0 if segment == 0 else 1000 + segment)
        watcher = quiet_watcher()
        run = Run(
            store, model=model, optimizer=opt, scheduler=sched, watch=watcher, every_steps=every_steps, async_=async_
        )
        if segment:
            resumed_at.append(run.step_count)
        try:
            for epoch in run.epochs(epochs):
                for x, y in run.batches(loader):
                    model.train()
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    if run.step_count + 1 in pending:
                        pending.discard(run.step_count + 1)
                        watcher.trigger("terminate")
                    run.step(loss=loss.item())
                if epoch in pending_epochs:
                    pending_epochs.discard(epoch)
                    watcher.trigger("terminate")
            run.finish()
            return model, opt, resumed_at
        except SystemExit as e:
            assert e.code == EXIT_PREEMPTED
            continue
    raise AssertionError("more interruptions than planned")


def assert_same(a: nn.Module, b: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k}"
    for pa, pb in zip(oa.state_dict()["state"].values(), ob.state_dict()["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), f"{k}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt, _ = train(tmp_path_factory.mktemp("ref") / "store")
    return model, opt


def test_uninterrupted_run_is_reproducible(tmp_path: Path, reference: Any) -> None:
    model, opt, _ = train(tmp_path / "store")
    assert_same(model, reference[0], opt, reference[1])
    # and training really moved the weights away from the initialisation
    init, _, _ = make_model(0)
    assert not torch.equal(init[0].weight, reference[0][0].weight)


@pytest.mark.parametrize(
    "interrupt_at, after_epoch",
    [
        ((3,), ()),  # mid-epoch, before any periodic save
        ((11, 19), ()),  # mid-epoch twice
        ((PER_EPOCH,), ()),  # on the last batch of an epoch
        ((), (0,)),  # between epochs (notice seen at the epoch boundary)
        ((13, 14), ()),  # twice in a row
        ((2 * PER_EPOCH + 1,), (1,)),  # boundary, then the first batch of the next epoch
    ],
)
def test_interrupted_run_is_bit_identical(tmp_path: Path, reference: Any, interrupt_at: Any, after_epoch: Any) -> None:
    model, opt, resumed_at = train(tmp_path / "store", interrupt_at=interrupt_at, interrupt_after_epoch=after_epoch)
    assert_same(model, reference[0], opt, reference[1])
    # zero steps lost: every resume starts at the step the notice was handled at
    for want, got in zip(
        sorted(interrupt_at), [r for r in resumed_at if r % PER_EPOCH or not after_epoch], strict=False
    ):
        assert got == want


def test_random_interruptions_sync_saves(tmp_path: Path, reference: Any) -> None:
    import random

    rng = random.Random(7)
    steps = sorted(rng.sample(range(1, 3 * PER_EPOCH), 3))
    model, opt, resumed_at = train(tmp_path / "store", interrupt_at=steps, async_=False, every_steps=None)
    assert resumed_at == steps
    assert_same(model, reference[0], opt, reference[1])


class Counting(Dataset[Any]):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base
        self.count = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        with self.count.get_lock():
            self.count.value += 1
        return self.base[i]


def test_workers_resume_skips_consumed_batches_and_is_exact(tmp_path: Path) -> None:
    ds = Counting(dataset())

    def loader() -> DataLoader[Any]:
        return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)

    ref, ref_opt, _ = train(tmp_path / "ref", epochs=2, loader_factory=loader)

    def reset(segment: int) -> None:
        ds.count.value = 0

    model, opt, resumed_at = train(
        tmp_path / "store", epochs=2, interrupt_at=(PER_EPOCH + 3,), loader_factory=loader, on_segment=reset
    )
    assert resumed_at == [PER_EPOCH + 3]
    assert_same(model, ref, opt, ref_opt)
    # the resumed process loaded only the 5 batches left in epoch 1 (4 of 8 items, 1 of 4), not the 3 consumed
    assert ds.count.value == 4 * BATCH + (N_ITEMS - 7 * BATCH)


def test_stateful_dataloader_resume_is_exact(tmp_path: Path, reference: Any) -> None:
    sdl = pytest.importorskip("torchdata.stateful_dataloader")

    def loader() -> Any:
        # Seeded before it is built, as a job does: the sampler seeds itself from the global RNG
        # when built, which here would depend on the tests this process ran before (under xdist,
        # any of them).
        torch.manual_seed(7)
        return sdl.StatefulDataLoader(dataset(), batch_size=BATCH, shuffle=True)

    ref, ref_opt, _ = train(tmp_path / "ref", epochs=2, loader_factory=loader)
    model, opt, _ = train(tmp_path / "store", epochs=2, interrupt_at=(5, PER_EPOCH + 2), loader_factory=loader)
    assert_same(model, ref, opt, ref_opt)


def test_rebalance_saves_and_continues(tmp_path: Path) -> None:
    model, opt, _ = make_model(0)
    watcher = quiet_watcher()
    run = Run(tmp_path, model=model, optimizer=opt, watch=watcher, every_steps=1000)
    for _ in range(3):
        run.step()
    watcher.trigger("rebalance")
    run.step()
    run.step()
    assert not run.should_stop
    run.checkpointer.wait()
    infos = run.checkpointer.list()
    assert [(i.step, i.reason) for i in infos] == [(4, "rebalance")]
    run.close()


def test_notice_without_exit_sets_should_stop(tmp_path: Path) -> None:
    model, opt, _ = make_model(0)
    watcher = quiet_watcher()
    run = Run(tmp_path, model=model, optimizer=opt, watch=watcher, exit_on_notice=False, every_steps=1000)
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)
    seen = 0
    for _epoch in run.epochs(5):
        for _x, _y in run.batches(loader):
            seen += 1
            if seen == 3:
                watcher.trigger("terminate", deadline_in=60)
            run.step()
    assert run.should_stop
    assert seen == 3  # the loop stopped right after the step that saw the notice
    assert run.finish() is False
    ckpt = Checkpointer(tmp_path)
    assert [(i.step, i.reason, i.metadata["batch"]) for i in ckpt.list()] == [(3, "notice", 3)]
    assert ckpt.completion() is None
    ckpt.close()


def test_finish_marks_complete_and_restores_extra_state(tmp_path: Path) -> None:
    model, opt, _ = make_model(0)
    run = Run(tmp_path, model=model, optimizer=opt, watch=False, extra_state={"best": 0.5, "notes": ["a"]})
    assert run.resumed_from is None
    for _ in range(7):
        run.step()
    run.extra_state["best"] = 0.9
    assert run.finish() is True
    ckpt = Checkpointer(tmp_path)
    done = ckpt.completion()
    assert done is not None and done["step"] == 7
    assert [(i.step, i.reason) for i in ckpt.list()] == [(7, "final")]
    ckpt.close()

    model2, opt2, _ = make_model(5)
    run2 = Run(tmp_path, model=model2, optimizer=opt2, watch=False, extra_state={"best": 0.0, "notes": []})
    assert run2.step_count == 7
    assert run2.extra_state == {"best": 0.9, "notes": ["a"]}
    assert run2.resumed_from is not None and run2.resumed_from.step == 7
    assert torch.equal(model2[0].weight, model[0].weight)
    run2.close()


def test_periodic_every_seconds_and_bad_arguments(tmp_path: Path) -> None:
    model, _, _ = make_model(0)
    # long enough that a stall between the Run's start and its first step (a loaded machine) does
    # not make step 1 due too
    run = Run(tmp_path, model=model, watch=False, every_seconds=1.0)
    run.step()
    time.sleep(1.2)
    run.step()
    run.checkpointer.wait()
    assert [i.step for i in run.checkpointer.list()] == [2]
    run.close()
    with pytest.raises(ValueError, match="every_steps"):
        Run(tmp_path, model=model, every_steps=0, watch=False)
    with pytest.raises(ValueError, match="reserved"):
        Run(tmp_path, model=model, extra_state={"model": 1}, watch=False)


CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from torch import nn
    import spotsafe
    torch.manual_seed(0 if len(sys.argv) < 3 else int(sys.argv[2]))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(42)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    run = spotsafe.Run(model=model, optimizer=opt, every_steps=7)
    Path(sys.argv[1] + ".ready").write_text(str(run.step_count))
    for epoch in run.epochs(20):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))  # keeps a notice's window open
            run.step()
    run.finish()
    torch.save(model.state_dict(), sys.argv[1])
""")


def run_child(tmp_path: Path, store: Path, out: Path, env: dict[str, str], init: int = 0) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(init)],
        text=True,
        env={**env, "SPOTSAFE_STORE": str(store)},
        stderr=subprocess.PIPE,
    )


def wait_ready(out: Path, proc: subprocess.Popen[str]) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        return Path(str(out) + ".ready").exists()

    wait_until(ready, 60, what=f"{out}.ready")


@pytest.mark.slow
def test_aws_notice_in_subprocess_exits_75_and_resumes_exactly(tmp_path: Path) -> None:
    from spotsafe.rehearsal.simulators.aws import AWSSimulator

    events = tmp_path / "events.jsonl"
    with AWSSimulator() as sim:
        env = {
            **os.environ,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": sim.endpoint,
            "SPOTSAFE_SOURCES": "aws,signal",
            "SPOTSAFE_EVENTS": str(events),
        }
        # the uninterrupted reference (the simulator never armed)
        ref = run_child(tmp_path, tmp_path / "ref", tmp_path / "ref.pt", env)
        _, err = ref.communicate(timeout=120)
        assert ref.returncode == 0, f"{err}"

        proc = run_child(tmp_path, tmp_path / "store", tmp_path / "a.pt", {**env, "STEP_SLEEP": "0.05"})
        wait_ready(tmp_path / "a.pt", proc)
        sim.arm("terminate")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_PREEMPTED, f"{err}"
        sim.disarm()
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    notice = next(e for e in recorded if e["event"] == "notice")
    durable = next(e for e in recorded if e["event"] == "durable")
    assert notice["source"] == "aws"
    ckpt = Checkpointer(tmp_path / "store")
    newest = ckpt.latest(verify=True)
    assert newest is not None
    assert newest.step == notice["step"] == durable["step"]
    assert newest.reason == "notice"
    assert ckpt.completion() is None
    ckpt.close()
    # the replacement instance: different init, resumes at the notice's step and ends bit-identical
    proc = run_child(
        tmp_path,
        tmp_path / "store",
        tmp_path / "b.pt",
        {**os.environ, "SPOTSAFE_SOURCES": "none", "SPOTSAFE_EVENTS": str(events)},
        init=99,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{err}"
    resumed = [json.loads(line) for line in events.read_text().splitlines() if '"resumed"' in line]
    assert resumed[-1]["step"] == notice["step"]
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "b.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}"


def test_sigterm_in_subprocess_saves_and_exits_75(tmp_path: Path) -> None:
    env = {**os.environ, "SPOTSAFE_SOURCES": "signal", "STEP_SLEEP": "0.05"}
    proc = run_child(tmp_path, tmp_path / "store", tmp_path / "a.pt", env)
    wait_ready(tmp_path / "a.pt", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, f"{err}"
    ckpt = Checkpointer(tmp_path / "store")
    newest = ckpt.latest(verify=True)
    assert newest is not None and newest.reason == "notice"
    ckpt.close()
    assert "durable" in err


def test_exported_name() -> None:
    assert spotsafe.Run is Run
    assert spotsafe.EXIT_PREEMPTED == 75


def test_every_epochs_and_fixed_seed(tmp_path: Path) -> None:
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)
    orders = []
    for k, init in enumerate((0, 1)):
        model, opt, _ = make_model(init)  # a different global RNG state each time
        run = Run(tmp_path / f"s{k}", model=model, optimizer=opt, watch=False, every_epochs=1, seed=3)
        order = []
        for _epoch in run.epochs(2):
            for x, _y in run.batches(loader):
                order.append(x[:, 0].tolist())
                run.step()
        run.checkpointer.wait()
        assert [(i.step, i.epoch, i.metadata["batch"]) for i in run.checkpointer.list()] == [(8, 1, 0), (16, 2, 0)]
        run.close()
        orders.append(order)
    # with seed= the shuffle depends on (seed, epoch) only, not on the global RNG
    assert orders[0] == orders[1]
    assert orders[0][:PER_EPOCH] != orders[0][PER_EPOCH:]


def test_a_failed_periodic_save_does_not_stop_the_notice_save(tmp_path: Path) -> None:
    model, opt, _ = make_model(0)
    watcher = quiet_watcher()
    run = Run(tmp_path, model=model, optimizer=opt, watch=watcher, exit_on_notice=False, every_steps=1000)
    # A background save that failed (a full disk, an S3 timeout) waits to be re-raised.
    run.checkpointer._error = OSError(28, "No space left on device")
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)
    seen = 0
    for _epoch in run.epochs(5):
        for _x, _y in run.batches(loader):
            seen += 1
            if seen == 2:
                watcher.trigger("terminate", deadline_in=60)
            run.step()
    assert run.should_stop
    ckpt = Checkpointer(tmp_path)
    assert [(i.step, i.reason) for i in ckpt.list()] == [(2, "notice")]
    ckpt.close()
    run.close()


def test_synchronous_periodic_saves_are_not_put_off_by_pruning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync save is durable when step() returns; the pruning behind it must not defer the next one."""
    from spotsafe.checkpoint.writer import Checkpointer

    real_retain = Checkpointer._retain
    pruning = threading.Event()

    def slow_retain(self: Checkpointer, step: int) -> None:
        pruning.set()
        time.sleep(1.0)  # a slow listing (S3, a busy disk) while the loop goes on
        real_retain(self, step)

    monkeypatch.setattr(Checkpointer, "_retain", slow_retain)
    model, opt, _ = make_model(0)
    run = Run(tmp_path, model=model, optimizer=opt, watch=False, every_steps=2, async_=False)
    try:
        for _ in range(4):
            run.step()
        assert pruning.is_set()
        assert [i.step for i in run.checkpointer.list()] == [2, 4]  # step 4 saved at step 4, not later
    finally:
        run.close()
