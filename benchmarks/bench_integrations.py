"""Time to resume at 90% of an epoch of 100k small batches: spotsafe's integrations vs the frameworks' own resume.

    python benchmarks/bench_integrations.py [--batches 100000] [--rounds 3] [--frameworks lightning,transformers]

What is timed: from the call to ``trainer.fit(...)`` / ``trainer.train(...)`` in a fresh
process (model and trainer already built, the same for every contender) to the start of
the first resumed training step. Contenders, in the same run, interleaved with the order
rotated every round, each reading its own checkpoint files:

- Lightning: ``SpotsafeCallback`` (plain shuffled ``DataLoader``); Lightning's own
  ``fit(ckpt_path=...)`` with the same plain ``DataLoader`` (it continues the count at batch
  90,000 but draws the batches from a new iterator: the epoch's first batches again, not
  the remaining ones); and ``fit(ckpt_path=...)`` with torchdata's ``StatefulDataLoader``
  (Lightning's exact mid-epoch resume).
- Hugging Face: ``SpotsafeCallback``; ``train(resume_from_checkpoint=...)``.

Making a checkpoint at batch 90,000 for real would take 90,000 framework steps per
contender; instead each contender's checkpoint is taken for real at step K (a few dozen
steps into the same epoch) and its progress counters are then moved to 90,000 (loop
progress, global step, scheduler step count, data position; nothing else), so every
resume does the full skip of 90,000 batches. Each resumed process checks it starts at
batch 90,000. Medians over rounds, with the spread (min-max): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
FEATURES = 32
K = 40  # the real checkpoint's step


# ----------------------------------------------------------------------------- worker side


def _data(batches: int) -> Any:
    import torch
    from torch.utils.data import Dataset

    class Small(Dataset):
        """Small samples with a little per-sample work, as a decoded record would have."""

        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(1)
            self.n = n
            self.x = torch.randn(4096, FEATURES, generator=g)
            self.y = torch.randint(0, 4, (4096,), generator=g)

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> Any:
            j = i % 4096
            return self.x[j] * 1.0, self.y[j]

    return Small(batches * BATCH)


def _loader(batches: int, stateful: bool) -> Any:
    import torch

    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(_data(batches), batch_size=BATCH, shuffle=True)
    return torch.utils.data.DataLoader(_data(batches), batch_size=BATCH, shuffle=True)


def _net() -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 4),
    )


def _lightning(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from spotsafe.integrations.lightning import SpotsafeCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1000)}

    marks: dict[str, Any] = {}

    class Probe(L.Callback):
        def __init__(self, spot: SpotsafeCallback | None) -> None:
            self.spot = spot

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if args.mode == "resume":
                marks.update(first=time.perf_counter(), batch_idx=batch_idx, step=trainer.global_step)
                _report(args, marks)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if args.mode == "prepare" and trainer.global_step == K:
                if self.spot is not None:
                    self.spot.run.checkpointer.wait()
                else:
                    trainer.save_checkpoint(str(Path(args.dir) / "lightning.ckpt"))
                os._exit(0)

    L.seed_everything(0, verbose=False)
    stateful = args.contender == "lightning-stateful"
    spot = SpotsafeCallback(args.dir, every_steps=K, watch=False) if args.contender == "spotsafe" else None
    callbacks: list[Any] = ([spot] if spot is not None else []) + [Probe(spot)]
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    model, loader = Net(), _loader(args.batches, stateful)
    ckpt = str(Path(args.dir) / "lightning.ckpt") if args.mode == "resume" and spot is None else None
    _preimport()
    marks["start"] = time.perf_counter()
    trainer.fit(model, loader, ckpt_path=ckpt)


def _transformers(args: argparse.Namespace) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from spotsafe.integrations.transformers import SpotsafeCallback

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: Any, labels: Any) -> Any:
            return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

    def collate(items: list[Any]) -> dict[str, Any]:
        return {"x": torch.stack([i[0] for i in items]), "labels": torch.stack([i[1] for i in items])}

    marks: dict[str, Any] = {}

    class Probe(TrainerCallback):
        def __init__(self, spot: SpotsafeCallback | None) -> None:
            self.spot = spot

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if args.mode == "resume":
                marks.update(first=time.perf_counter(), step=state.global_step)
                _report(args, marks)

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if args.mode == "prepare" and state.global_step == K and self.spot is not None:
                self.spot.run.checkpointer.wait()
                os._exit(0)

        def on_save(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if args.mode == "prepare" and state.global_step == K:
                os._exit(0)

    torch.manual_seed(0)
    spot = SpotsafeCallback(args.dir, every_steps=K, watch=False) if args.contender == "spotsafe" else None
    targs = TrainingArguments(
        output_dir=str(Path(args.dir) / "hf"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        save_strategy="no" if spot is not None else "steps",
        save_steps=K,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    callbacks: list[Any] = ([spot] if spot is not None else []) + [Probe(spot)]
    trainer = Trainer(
        model=Net(), args=targs, train_dataset=_data(args.batches), data_collator=collate, callbacks=callbacks
    )
    resume = str(Path(args.dir) / "hf" / f"checkpoint-{K}") if args.mode == "resume" and spot is None else None
    _preimport()
    marks["start"] = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)


def _preimport() -> None:
    """Import what a resume imports lazily, before the clock starts: every contender's modules are loaded
    before ``fit``/``train`` is called (spotsafe's are imported on first use; without this the window
    would also time compiling them where bytecode is not cached, as under PYTHONDONTWRITEBYTECODE)."""
    import spotsafe.checkpoint.writer
    import spotsafe.cloud.watcher
    import spotsafe.data
    import spotsafe.distributed
    import spotsafe.run
    import spotsafe.state
    import spotsafe.storage.local  # noqa: F401


def _report(args: argparse.Namespace, marks: dict[str, Any]) -> None:
    print("BENCH " + json.dumps({"seconds": marks["first"] - marks["start"], **marks}), flush=True)
    os._exit(0)


# ----------------------------------------------------------------------------- moving a checkpoint to 90%


def _shift(node: Any, delta: int, skip: tuple[str, ...] = ("rng",)) -> Any:
    """Every int near K (progress counters) moves by ``delta``; near K*BATCH (sample counts) by delta*BATCH."""
    if isinstance(node, bool):
        return node
    if isinstance(node, int):
        if K - 2 <= node <= K + 2:
            return node + delta
        if BATCH * (K - 2) <= node <= BATCH * (K + 2):
            return node + delta * BATCH
        return node
    if isinstance(node, dict):
        return {k: v if k in skip else _shift(v, delta, skip) for k, v in node.items()}
    if isinstance(node, list):
        return [_shift(v, delta, skip) for v in node]
    if isinstance(node, tuple):
        return tuple(_shift(v, delta, skip) for v in node)
    return node


def _hf_state(text: str, target: int, total: int) -> str:
    state = json.loads(text)
    state["global_step"] = target
    state["epoch"] = target / total
    return json.dumps(state)


def _move_spotsafe(directory: Path, framework: str, target: int, total: int) -> None:
    from spotsafe.checkpoint.writer import Checkpointer

    ckpt = Checkpointer(str(directory), async_=False)
    try:
        info = ckpt.latest()
        assert info is not None and info.step == K, f"{info}"
        tree = ckpt.load(info)
        delta = target - K
        if framework == "lightning":
            tree["lightning"] = _shift(tree["lightning"], delta, skip=("state_dict", "optimizer_states"))
        else:
            tree["transformers"]["trainer_state"] = _hf_state(tree["transformers"]["trainer_state"], target, total)
            tree["transformers"]["scheduler"] = _shift(tree["transformers"]["scheduler"], delta)
        tree["spotsafe"] = _shift(tree["spotsafe"], delta)
        tree["spotsafe"]["step"] = target
        ckpt.save(target, tree, epoch=0, reason="periodic", metadata={"batch": target})
        ckpt.wait()
    finally:
        ckpt.close()
    shutil.rmtree(directory / info.name)


def _move_lightning(directory: Path, target: int) -> None:
    import torch

    path = directory / "lightning.ckpt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["loops"] = _shift(ckpt["loops"], target - K)
    ckpt["lr_schedulers"] = _shift(ckpt["lr_schedulers"], target - K)
    ckpt["global_step"] = target
    torch.save(ckpt, path)


def _move_hf(directory: Path, target: int, total: int) -> None:
    path = directory / "hf" / f"checkpoint-{K}" / "trainer_state.json"
    path.write_text(_hf_state(path.read_text(), target, total))


# ----------------------------------------------------------------------------- orchestration


def _worker(framework: str, contender: str, mode: str, directory: Path, batches: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", framework, contender, mode, str(directory), "--batches", str(batches)]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SPOTSAFE_SOURCES": "none",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework}/{contender} {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return dict(json.loads(line[6:]))
    return {}


CONTENDERS = {
    "lightning": ["spotsafe", "lightning", "lightning-stateful"],
    "transformers": ["spotsafe", "hf"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frameworks", default="lightning,transformers")
    parser.add_argument("--worker", nargs=4, metavar=("FRAMEWORK", "CONTENDER", "MODE", "DIR"))
    args = parser.parse_args(argv)
    if args.worker:
        framework, args.contender, args.mode, args.dir = args.worker
        (_lightning if framework == "lightning" else _transformers)(args)
        return 0

    target = args.batches * 9 // 10
    root = Path(tempfile.mkdtemp(prefix="spotsafe-bench-integrations-"))
    try:
        for framework in args.frameworks.split(","):
            names = CONTENDERS[framework]
            dirs = {name: root / framework / name for name in names}
            for name, directory in dirs.items():
                directory.mkdir(parents=True)
                _worker(framework, name, "prepare", directory, args.batches)
                if name == "spotsafe":
                    _move_spotsafe(directory, framework, target, args.batches)
                elif framework == "lightning":
                    _move_lightning(directory, target)
                else:
                    _move_hf(directory, target, args.batches)
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    mark = _worker(framework, name, "resume", dirs[name], args.batches)
                    where = mark.get("batch_idx", mark.get("step"))
                    if framework == "lightning" and where != target:
                        raise RuntimeError(f"{name} resumed at batch {where}, not {target}")
                    if framework == "transformers" and mark.get("step") != target:
                        raise RuntimeError(f"{name} resumed at step {mark.get('step')}, not {target}")
                    times[name].append(float(mark["seconds"]))
            print(
                f"\n{framework}: resume at batch {target:,} of {args.batches:,} (batch {BATCH}), {args.rounds} rounds"
            )
            for name in names:
                t = times[name]
                ratio = statistics.median(a / b for a, b in zip(t, times["spotsafe"], strict=True))
                print(
                    f"  {name:20s} median {statistics.median(t):6.2f} s  (min {min(t):.2f}, max {max(t):.2f})"
                    f"  {ratio:5.2f}x spotsafe's time"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
