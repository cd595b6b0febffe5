"""The spotsafe command: ls, verify, and delegation to the other -m modules."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.checkpoint.manifest import MANIFEST, checkpoint_name
from spotsafe.checkpoint.writer import Checkpointer
from spotsafe.cli.main import main


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
    assert out[1].split()[:3] == ["step-000000000100-g000000000001", "100", "1"]
    assert out[2].split()[:3] == ["step-000000000200-g000000000001", "200", "2"]
    assert "notice" in out[2] and "yes (sizes)" in out[2]
    assert "KiB" in out[1]


def test_ls_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path / "nothing")]) == 0
    assert "no checkpoints" in capsys.readouterr().out


def test_verify_passes_then_fails_on_a_flipped_byte(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.count("yes (checksums)") == 2
    data = next((store / checkpoint_name(200, 1)).glob("*.bin"))
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
    (store / checkpoint_name(300, 1)).mkdir()
    manifest = store / checkpoint_name(200, 1) / MANIFEST
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


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("resume", "spotsafe.resume"),
        ("volume", "spotsafe.cloud.aws.volume.cli"),
        ("simulate", "spotsafe.rehearsal.cli"),
    ],
)
def test_subcommands_delegate_to_their_modules(command: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: calls.append(list(argv)) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module, fake)
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


# ----------------------------------------------------------------------------- hostile inputs


def test_verify_on_a_missing_store_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "does-not-exist")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_empty_store_argument_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("ls", "verify"):
        assert main([command, ""]) == 2
        assert "empty" in capsys.readouterr().err


def test_a_store_that_is_a_file_or_a_bad_url_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    for store in (str(tmp_path / "file"), "garbage://x", "s3://"):
        assert main(["ls", store]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_corrupt_completion_record_does_not_abort_ls(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store / "COMPLETE.json").write_text("")
    assert main(["ls", str(store)]) == 0
    captured = capsys.readouterr()
    assert "step-000000000200" in captured.out
    assert "completion record unreadable" in captured.err
    assert main(["verify", str(store)]) == 1


def test_verify_agrees_with_load_on_a_forged_tree(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checksums forged to match used to make verify say "yes (checksums)" for a checkpoint load() could not build."""
    import json

    from spotsafe.checkpoint.files import checksum
    from spotsafe.errors import CheckpointCorrupt

    d = store / checkpoint_name(200, 1)
    manifest = json.loads((d / MANIFEST).read_text())
    entry = next(f for f in manifest["files"] if f["role"] == "tree")
    tree = json.loads((d / entry["path"]).read_text())
    tree["tensors"][0]["device"] = "garbage"
    data = json.dumps(tree).encode()
    (d / entry["path"]).write_bytes(data)
    entry["size"], entry["checksum"] = len(data), checksum(data)
    (d / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "yes (checksums)" in next(line for line in out.splitlines() if "step-000000000100" in line)
    assert "bad device" in next(line for line in out.splitlines() if "step-000000000200" in line)
    with Checkpointer(store) as c, pytest.raises(CheckpointCorrupt, match="bad device"):
        c.load(200)
