"""The spotsafe command: ls, verify, and delegation to the other -m modules."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.checkpoint import MANIFEST, Checkpointer, checkpoint_name
from spotsafe.cli import main


@pytest.fixture
def store(tmp_path: Path) -> Path:
    with Checkpointer(tmp_path, keep_last=5, async_=False) as c:
        c.save(100, {"w": torch.ones(1000)}, epoch=1)
        c.save(200, {"w": torch.ones(1000)}, epoch=2, reason="notice")
    return tmp_path


def test_ls_prints_a_table(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "STEP", "EPOCH", "SIZE", "AGE", "REASON", "INTACT"]
    assert out[1].split()[:3] == ["step-000000000100", "100", "1"]
    assert out[2].split()[:3] == ["step-000000000200", "200", "2"]
    assert "notice" in out[2] and "yes (sizes)" in out[2]
    assert "KiB" in out[1]


def test_ls_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path / "nothing")]) == 0
    assert "no checkpoints" in capsys.readouterr().out


def test_verify_passes_then_fails_on_a_flipped_byte(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.count("yes (checksums)") == 2
    data = next((store / checkpoint_name(200)).glob("*.bin"))
    raw = bytearray(data.read_bytes())
    raw[10] ^= 1
    data.write_bytes(bytes(raw))
    assert main(["ls", str(store)]) == 0  # sizes still match: ls does not read the data
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    captured = capsys.readouterr()
    assert "checksum mismatch" in captured.out
    assert "1 damaged" in captured.err
    assert main(["verify", str(store), "--step", "100"]) == 0
    assert main(["verify", str(store), "--step", "7"]) == 1


def test_incomplete_and_newer_format_are_shown(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store / checkpoint_name(300)).mkdir()
    manifest = store / checkpoint_name(200) / MANIFEST
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 9'))
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "incomplete" in out
    assert "format version 9 is newer" in out


def test_completion_is_shown(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Checkpointer(store) as c:
        c.mark_complete(200)
    assert main(["ls", str(store)]) == 0
    assert "run complete at step 200" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["resume", "volume", "simulate"])
def test_subcommands_delegate_to_their_modules(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    fake = types.ModuleType(f"spotsafe.{command}")
    fake.main = lambda argv: calls.append(list(argv)) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"spotsafe.{command}", fake)
    assert main([command, "--store", "/x", "--", "python", "train.py"]) == 3
    assert calls == [["--store", "/x", "--", "python", "train.py"]]


def test_python_dash_m_spotsafe(store: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "spotsafe", "verify", str(store)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"{r.stderr}"
    assert "step-000000000200" in r.stdout
    r = subprocess.run([sys.executable, "-m", "spotsafe"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "ls" in r.stderr and "verify" in r.stderr
