"""spotsafe.integrations with the real frameworks on CPU: scripts whose only spotsafe line is the
callback (or AcceleratedRun), interrupted under ``python -m spotsafe.resume`` and resumed to
final weights bit-identical to the same script run without interruption.

Each script (tests/integration_scripts/) builds a tiny model, shuffles a small map-style
dataset, uses dropout (RNGs), momentum and an LR schedule (optimizer and scheduler state),
and records the dataset indices each process loads. The tests check exit 75 on the
notice, a mid-epoch notice checkpoint, the bit-identical final weights, and that the
resumed launches load no more samples than the uninterrupted run plus the one batch a
framework prefetches per launch (a replay of the consumed batches would load them again).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spotsafe import EXIT_PREEMPTED
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.rehearsal.simulators.aws import AWSSimulator

from .conftest import OFFLINE_ENV
from .helpers import stop_child, wait_until

PY = sys.executable
SCRIPTS = Path(__file__).parent / "integration_scripts"
ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
BATCH = 4
STEPS_PER_EPOCH = 8  # 32 samples, batch 4, one process (4 per rank under 2-rank DDP)

FRAMEWORKS = {
    "lightning": ("lightning", SCRIPTS / "lightning_train.py"),
    "transformers": ("transformers", SCRIPTS / "hf_train.py"),
    "accelerate": ("accelerate", SCRIPTS / "accelerate_train.py"),
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
    env.update(OFFLINE_ENV)
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "SPOTSAFE_SOURCES": "none",
        }
    )
    env.update(extra)
    return env


def _wait_until(what: str, ready: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 240) -> None:
    def check() -> bool:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout is not None else ""
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{out[-4000:]}")
        return ready()

    try:
        wait_until(check, timeout, interval=0.1, what=what)
    except AssertionError:
        stop_child(proc)
        raise


def _supervised(store: Path, command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "spotsafe.resume", "--store", str(store), "--backoff", "0", "--", *command],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-4000:]}") from None
    return proc.returncode, out


def _start_reference(command: list[str], tmp: Path, *args: str) -> subprocess.Popen[str]:
    """The same script, uninterrupted (its own store), run beside the interrupted launches."""
    return subprocess.Popen(
        [*command, str(tmp / "ref"), *args],
        env=_env(SPOTSAFE_STORE=str(tmp / "ref-store")),
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _reference(proc: subprocess.Popen[str], tmp: Path) -> dict[str, torch.Tensor]:
    code, log = _finish(proc)
    assert code == 0, f"{log[-4000:]}"
    return torch.load(tmp / "ref" / "weights.pt")


def _fetched(out: Path) -> int:
    return sum(len(json.loads(p.read_text())) for p in out.glob("fetched-*.json"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"final weights differ from the uninterrupted run: {differ}"


def _notice_checkpoint(store: Path, steps_per_epoch: int, world_size: int = 1) -> int:
    ckpt = Checkpointer(str(store))
    try:
        newest = ckpt.latest(verify=True)
    finally:
        ckpt.close()
    assert newest is not None
    assert (newest.reason, newest.world_size) == ("notice", world_size)
    assert newest.step % steps_per_epoch != 0, f"notice checkpoint at step {newest.step} is not mid-epoch"
    return newest.step


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "transformers", "accelerate"])
def test_sigterm_then_aws_notice_then_finish_bit_identical(framework: str, tmp_path: Path) -> None:
    """Launch 1 gets SIGTERM (to the supervisor), launch 2 the AWS simulator's spot notice, both
    mid-epoch; each exits 75; launch 3 finishes with the uninterrupted run's exact weights."""
    module, script = FRAMEWORKS[framework]
    pytest.importorskip(module)
    command = [PY, str(script)]
    ref = _start_reference(command, tmp_path)
    store, out = tmp_path / "store", tmp_path / "out"
    pause = "6:0,14:0"

    first = _supervised(store, [*command, str(out)], _env(SPOTSAFE_TEST_PAUSE=pause))
    _wait_until("step 6", (out / "reached-6-0").exists, first)
    first.send_signal(signal.SIGTERM)  # as systemd stopping the boot service: forwarded to the script
    code, log = _finish(first)
    assert code == EXIT_PREEMPTED, f"{log[-4000:]}"
    assert "notice from signal" in log
    step1 = _notice_checkpoint(store, STEPS_PER_EPOCH)

    with AWSSimulator() as sim:
        env = _env(SPOTSAFE_TEST_PAUSE=pause, SPOTSAFE_SOURCES="aws", AWS_EC2_METADATA_SERVICE_ENDPOINT=sim.endpoint)
        second = _supervised(store, [*command, str(out)], env)
        _wait_until("step 14", (out / "reached-14-0").exists, second)
        sim.arm("terminate")
        code, log = _finish(second)
    assert code == EXIT_PREEMPTED, f"{log[-4000:]}"
    assert "notice from aws" in log
    step2 = _notice_checkpoint(store, STEPS_PER_EPOCH)
    assert step2 > step1

    code, log = _finish(_supervised(store, [*command, str(out)], _env()))
    assert code == 0, f"{log[-4000:]}"
    _assert_same(_reference(ref, tmp_path), torch.load(out / "weights.pt"))
    ref_fetched = _fetched(tmp_path / "ref")
    # Two interrupted launches may each have loaded one batch ahead (prefetch); replaying
    # the consumed batches of the two interrupted epochs would load 6+ more each.
    assert ref_fetched <= _fetched(out) <= ref_fetched + 2 * BATCH


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_ddp_notice_on_one_rank_bit_identical(framework: str, tmp_path: Path) -> None:
    """2-rank DDP (gloo) under torchrun: SIGTERM to rank 1 only; both ranks save at one agreed
    step, the job stops as preempted (75); the relaunch finishes with the uninterrupted weights."""
    module, script = FRAMEWORKS[framework]
    pytest.importorskip(module)
    command = [*TORCHRUN, str(script)]
    out, store = tmp_path / "out", tmp_path / "store"
    ref = _start_reference(command, tmp_path, "ddp")  # --standalone: its own free rendezvous port

    first = _supervised(store, [*command, str(out), "ddp"], _env(SPOTSAFE_TEST_PAUSE="5:1"))
    marker = out / "reached-5-1"
    _wait_until("rank 1 at step 5", marker.exists, first)
    os.kill(int(marker.read_text()), signal.SIGTERM)  # the notice reaches rank 1 only
    code, log = _finish(first)
    assert code == EXIT_PREEMPTED, f"{log[-4000:]}"
    _notice_checkpoint(store, STEPS_PER_EPOCH // 2, world_size=2)

    code, log = _finish(_supervised(store, [*command, str(out), "ddp"], _env()))
    assert code == 0, f"{log[-4000:]}"
    _assert_same(_reference(ref, tmp_path), torch.load(out / "weights.pt"))
    ref_fetched = _fetched(tmp_path / "ref")
    assert ref_fetched <= _fetched(out) <= ref_fetched + 2 * BATCH


# ----------------------------------------------------------------------------- in-process checks


class _Counting(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded += 1
        return i


def test_epoch_loader_continues_the_epoch_without_loading_consumed_batches() -> None:
    from spotsafe.integrations.core import EpochLoader

    torch.manual_seed(0)
    first = EpochLoader(torch.utils.data.DataLoader(_Counting(40), batch_size=4, shuffle=True), lambda: 2)
    whole = [b.tolist() for b in first]
    first.trained = 6
    state = first.state_dict()

    data = _Counting(40)
    torch.manual_seed(123)  # the global RNG has moved on: the saved epoch seed decides the order
    resumed = EpochLoader(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True), lambda: 2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == whole[6:]
    assert data.loaded == 16  # only the 4 remaining batches were loaded
    # The saved position applies once: the next epoch starts from batch 0 with a new order.
    assert len([b.tolist() for b in resumed]) == 10


def test_epoch_loader_rejects_an_unknown_state_format() -> None:
    from spotsafe.integrations.core import EpochLoader

    loader = EpochLoader([1, 2], lambda: 0)
    with pytest.raises(ValueError, match="format 7"):
        loader.load_state_dict({"format": 7})


def test_require_names_the_extra_to_install() -> None:
    from spotsafe.integrations.core import require

    with pytest.raises(ImportError, match=r"pip install 'spotsafe\[lightning\]'"):
        require("spotsafe_no_such_framework", "lightning")


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_callback_without_a_store_fails_at_construction(framework: str) -> None:
    pytest.importorskip(framework)
    import importlib

    cls = importlib.import_module(f"spotsafe.integrations.{framework}").SpotsafeCallback
    with pytest.raises(ValueError, match="SPOTSAFE_STORE"):
        cls()


def test_accelerated_run_takes_its_objects_from_the_accelerator(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from spotsafe.integrations.accelerate import AcceleratedRun

    with pytest.raises(TypeError, match="from the accelerator"):
        AcceleratedRun(Accelerator(cpu=True), str(tmp_path), model=torch.nn.Linear(1, 1), watch=False)


def test_hf_callback_added_after_construction_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import Trainer, TrainingArguments

    from spotsafe.integrations.transformers import SpotsafeCallback

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    data = [{"x": torch.randn(2), "labels": torch.tensor(0.0)} for _ in range(4)]
    args = TrainingArguments(str(tmp_path / "hf"), use_cpu=True, report_to="none", save_strategy="no", max_steps=1)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data)  # type: ignore[arg-type]
    trainer.add_callback(SpotsafeCallback(str(tmp_path / "store"), watch=False))
    with pytest.raises(RuntimeError, match="callbacks=\\[SpotsafeCallback"):
        trainer.train()
