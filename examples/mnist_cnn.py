"""A small CNN on MNIST that survives spot interruptions, through ``spotsafe.Run``.

    python examples/mnist_cnn.py --store /mnt/spotsafe/runs/mnist        # or s3://bucket/runs/mnist
    python -m spotsafe.resume --store s3://bucket/runs/mnist -- python examples/mnist_cnn.py
    python -m spotsafe.simulate rehearse --notice-after-steps 300 -- python examples/mnist_cnn.py

Kill it at any moment (or let a spot notice arrive) and run it again: it continues at
the very next batch with the same shuffle order and RNG state, and ends with the same
weights as a run that was never interrupted.

Data (``--data``): ``mnist`` (torchvision, downloaded into ./data), ``digits``
(scikit-learn's 1,797 real handwritten 8x8 digits that ship inside the package,
resized to 28x28: works with no internet), ``synthetic`` (fast, for tests) or ``auto``
(MNIST when it is on disk or can be downloaded, else digits, saying so).
The lines changed for spotsafe are marked ``# spotsafe``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spotsafe  # spotsafe

DEFAULT_EPOCHS = {"mnist": 2, "digits": 30, "synthetic": 2}


class Net(nn.Module):
    """The CNN of PyTorch's MNIST example, a little narrower (fast on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


def mnist(root: str) -> tuple[TensorDataset, TensorDataset]:
    from torchvision import datasets

    tensors = []
    for train in (True, False):
        ds = datasets.MNIST(root, train=train, download=True)
        x = ds.data.float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
        tensors.append(TensorDataset(x, ds.targets.clone()))
    return tensors[0], tensors[1]


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's handwritten digits (shipped with the package), 8x8 -> 28x28; 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def synthetic(n_train: int = 256, n_test: int = 128) -> tuple[TensorDataset, TensorDataset]:
    """Ten noisy class prototypes: learnable in a few steps, no download."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, 10, (n,), generator=g)
        return TensorDataset(prototypes[y] + 0.8 * torch.randn(n, 1, 28, 28, generator=g), y)

    return make(n_train), make(n_test)


def load_data(kind: str, root: str) -> tuple[str, TensorDataset, TensorDataset]:
    if kind == "synthetic":
        return "synthetic", *synthetic()
    if kind == "digits":
        return "digits", *digits()
    try:
        return "mnist", *mnist(root)
    except Exception as e:  # offline, blocked, or torchvision missing
        if kind == "mnist":
            raise SystemExit(f"MNIST could not be loaded into {root}: {e}") from e
        print(
            f"MNIST could not be downloaded ({type(e).__name__}: {e}); using scikit-learn's handwritten "
            "digits instead (1,797 real 8x8 images, resized to 28x28)",
            file=sys.stderr,
            flush=True,
        )
        return "digits", *digits()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any]) -> tuple[float, float]:
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss / n, correct / n


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MNIST CNN that survives spot interruptions (spotsafe example)")
    p.add_argument("--data", choices=["auto", "mnist", "digits", "synthetic"], default="auto")
    p.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    p.add_argument("--epochs", type=int, help=f"default: {DEFAULT_EPOCHS}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.0, help="Adadelta learning rate")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--store", help="checkpoint store: a path or URL (default: $SPOTSAFE_STORE or ./checkpoints/mnist_cnn)"
    )
    p.add_argument(
        "--every-seconds", type=float, help="fixed checkpoint interval (default: chosen automatically, every='auto')"
    )
    p.add_argument("--every-steps", type=int, help="also checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spotsafe.checkpoint").setLevel(logging.WARNING)  # one line per save is noise here
    torch.manual_seed(args.seed)
    name, train_set, test_set = load_data(args.data, args.data_dir)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[name]
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=500)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.85)
    print(
        f"data: {name} ({len(train_set)} train, {len(test_set)} test), {epochs} epochs, batch size {args.batch_size}",
        flush=True,
    )

    store = args.store or os.environ.get("SPOTSAFE_STORE") or "checkpoints/mnist_cnn"
    run = spotsafe.Run(
        store,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,  # spotsafe
        every_seconds=args.every_seconds,
        every_steps=args.every_steps,
    )
    if run.resumed_from is not None:
        print(f"resumed from step {run.step_count} (epoch {run.epoch}, batch {run.batch})", flush=True)

    progress: Any = None
    if not args.no_progress:
        try:
            from tqdm import tqdm as progress
        except ImportError:
            print("(install tqdm for progress bars: pip install spotsafe[examples])", file=sys.stderr)

    accuracy = 0.0
    for epoch in run.epochs(epochs):  # spotsafe
        model.train()
        batches = run.batches(train_loader)  # spotsafe
        bar = None
        if progress is not None:
            bar = progress(
                batches,
                total=len(train_loader),
                initial=run.batch,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                mininterval=0.5,
                dynamic_ncols=True,
            )
            batches = bar
        for x, y in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            run.step(loss=loss.item())  # spotsafe: may checkpoint; on a notice: checkpoint, exit 75
        if bar is not None:
            bar.close()
        scheduler.step()
        test_loss, accuracy = evaluate(model, test_loader)
        print(
            f"epoch {epoch + 1}/{epochs}: step {run.step_count}, test loss {test_loss:.4f}, "
            f"test accuracy {100 * accuracy:.2f}%",
            flush=True,
        )
    run.finish()  # spotsafe: final checkpoint; the run is marked complete
    print(f"done: {run.step_count} steps, final test accuracy {100 * accuracy:.2f}% on {name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
