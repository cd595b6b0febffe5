"""``spotsafe export`` (issue 29): a checkpoint's weights as model.safetensors / model.pt, loadable in a
process where spotsafe cannot be imported, equal to the run's weights; from a directory and from S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spotsafe import Run
from spotsafe.cli.main import main as cli_main

# Loads both files with spotsafe made unimportable, and prints a digest of every tensor.
LOADER = """
import sys
sys.modules["spotsafe"] = None  # any import of spotsafe now fails
import hashlib, json, torch
from safetensors.torch import load_file
def digest(sd):
    return {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()]
            for k, v in sd.items()}
out = {"safetensors": digest(load_file(sys.argv[1])), "pt": digest(torch.load(sys.argv[2], weights_only=True))}
assert sys.modules["spotsafe"] is None
print(json.dumps(out))
"""


def _digest(sd: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {
        k: [
            str(v.dtype),
            list(v.shape),
            hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
        ]
        for k, v in sd.items()
    }


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train(store: str, storage_options: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Module]:
    net_g, net_d = _net(), _net()
    opt = torch.optim.Adam([*net_g.parameters(), *net_d.parameters()], lr=0.01)
    run = Run(store, model={"G": net_g, "D": net_d}, optimizer=opt, watch=False, storage_options=storage_options)
    for _ in range(5):
        loss = net_g(torch.randn(6, 4)).pow(2).mean() + net_d(torch.randn(6, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step()
    assert run.finish()
    return net_g, net_d


def _load_elsewhere(tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model.safetensors"), str(tmp_path / "model.pt")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"{r.stderr}"
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_export_writes_standard_files_that_load_without_spotsafe(tmp_path: Path) -> None:
    """Fails on main: there was no export command."""
    net_g, _ = _train(str(tmp_path / "store"))
    for name in ("model.safetensors", "model.pt"):
        assert cli_main(["export", str(tmp_path / "store"), "--key", "model/G", "-o", str(tmp_path / name)]) == 0
    loaded = _load_elsewhere(tmp_path)
    expected = _digest(net_g.state_dict())  # weights and BatchNorm buffers, as the run ended
    assert loaded == {"safetensors": expected, "pt": expected}


def test_export_from_a_bucket(tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]) -> None:
    url = f"s3://{s3_bucket}/runs/gan"
    _, net_d = _train(url, s3_options)
    options = [f"--option=endpoint_url={s3_options['endpoint_url']}", "--option=region_name=us-east-1"]
    for name in ("model.safetensors", "model.pt"):
        assert cli_main(["export", url, "--key", "model.D", "-o", str(tmp_path / name), *options]) == 0
    expected = _digest(net_d.state_dict())
    assert _load_elsewhere(tmp_path) == {"safetensors": expected, "pt": expected}


def test_export_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train(str(tmp_path / "store"))
    store = str(tmp_path / "store")
    cases = [
        (["-o", str(tmp_path / "w.bin")], "must end in .safetensors, .pt or .pth"),
        (["-o", str(tmp_path / "w.pt")], "'model' holds several objects (D, G): give --key model/D"),
        (["--key", "ema", "-o", str(tmp_path / "w.pt")], "holds no 'ema' (at 'ema', there is:"),
        (["--step", "3", "-o", str(tmp_path / "w.pt")], "no committed checkpoint for step 3"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert cli_main(["export", store, *args]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("w.*")) and not list(tmp_path.glob(".w.*"))
    assert cli_main(["export", store, "--step", "5", "--key", "model/G", "-o", str(tmp_path / "g.pth")]) == 0
    assert "tensors of 'model/G' from step 5" in capsys.readouterr().out
