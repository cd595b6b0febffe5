"""TensorBoard across a kill -9 and a resume: SummaryWriter(purge_step=run.purge_step) logs each step once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from torch.utils.tensorboard import SummaryWriter
    import spotsafe
    store, logdir, kill_at, purge = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "purge"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(256, 4, generator=g), torch.randn(256, 1, generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)  # 32 steps an epoch
    run = spotsafe.Run(store, model=model, optimizer=opt, every_steps=10, async_=False, watch=False, report_every=None)
    writer = SummaryWriter(logdir, purge_step=run.purge_step if purge else None)
    marker = os.path.join(os.path.dirname(store), "killed")
    for epoch in run.epochs(2):
        for x, y in run.batches(loader):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            writer.add_scalar("loss", loss.item(), global_step=run.step_count)  # before step(): 0-based
            run.step(loss=loss.detach())
            if run.step_count == kill_at and not os.path.exists(marker):
                open(marker, "w").close()
                writer.flush()  # TensorBoard has steps past the last checkpoint: they must not show twice
                os.kill(os.getpid(), signal.SIGKILL)
    writer.close()
    run.finish()
""")


def _scalars(logdir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def _train(tmp: Path, name: str, *, kill_at: int, purge: bool) -> Path:
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    root = tmp / name
    root.mkdir()
    env = dict(os.environ, SPOTSAFE_SOURCES="signal")
    argv = [sys.executable, str(script), str(root / "store"), str(root / "tb"), str(kill_at), "purge" if purge else "-"]
    codes = [subprocess.run(argv, env=env, timeout=300, check=False).returncode]
    if kill_at > 0:
        codes.append(subprocess.run(argv, env=env, timeout=300, check=False).returncode)
    assert codes == ([-9, 0] if kill_at > 0 else [0])
    return root / "tb"


@pytest.mark.slow
def test_tensorboard_purge_step_keeps_each_step_once_across_a_kill(tmp_path: Path) -> None:
    straight = _scalars(_train(tmp_path, "straight", kill_at=-1, purge=True))
    resumed = _scalars(_train(tmp_path, "resumed", kill_at=37, purge=True))
    assert [s for s, _ in straight] == list(range(64))
    assert [s for s, _ in resumed] == list(range(64))  # steps 30-36 were logged twice and purged once
    assert resumed == straight  # the curve is the uninterrupted run's
    # without purge_step, TensorBoard keeps the interrupted launch's points past its checkpoint too
    unpurged = _scalars(_train(tmp_path, "unpurged", kill_at=37, purge=False))
    assert len(unpurged) > 64
