"""examples/mnist_cnn.py end to end with synthetic data, uninterrupted and through a rehearsal."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mnist_cnn.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mnist_cnn_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPOTSAFE_SOURCES": "signal"}
    return subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)


def final_line(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("done:")]
    return line


@pytest.mark.slow
def test_example_uninterrupted_and_rehearsed_end_identically(tmp_path: Path) -> None:
    args = [sys.executable, str(EXAMPLE), "--data", "synthetic", "--no-progress"]
    plain = run([*args, "--store", str(tmp_path / "plain")], tmp_path)
    assert plain.returncode == 0, f"{plain.stderr}"
    assert "epoch 1/2: step 8" in plain.stdout
    done = final_line(plain.stdout)
    assert done.startswith("done: 16 steps, final test accuracy")
    accuracy = float(re.search(r"accuracy ([\d.]+)%", done).group(1))  # type: ignore[union-attr]
    assert accuracy > 50.0  # it really learns (10 classes: chance is 10%)

    rehearsal = run(
        [
            sys.executable,
            "-m",
            "spotsafe.simulate",
            "rehearse",
            "--notice-after",
            "0",
            "--backoff",
            "0",
            "--store",
            str(tmp_path / "rehearsed"),
            "--",
            *args,
        ],
        tmp_path,
    )
    assert rehearsal.returncode == 0, f"{rehearsal.stderr}"
    assert "resumed from step" in rehearsal.stdout
    assert "steps lost:         0" in rehearsal.stdout
    # the interrupted-and-resumed run ends exactly where the uninterrupted one did
    assert final_line(rehearsal.stdout) == done
    # a later boot finds the run complete and does not train again
    again = run(
        [sys.executable, "-m", "spotsafe.resume", "--store", str(tmp_path / "rehearsed"), "--", *args], tmp_path
    )
    assert again.returncode == 0
    assert "already complete" in again.stdout
    assert "done:" not in again.stdout


def test_digits_fallback_data() -> None:
    pytest.importorskip("sklearn")
    example = load_example()
    train, test = example.digits()
    assert train.tensors[0].shape == (1437, 1, 28, 28)
    assert test.tensors[0].shape == (360, 1, 28, 28)
    assert set(train.tensors[1].tolist()) == set(range(10))


def test_net_shapes() -> None:
    import torch

    example = load_example()
    out = example.Net()(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
