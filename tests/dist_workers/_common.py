"""Helpers shared by the scripts torchrun launches in tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from spotsafe.distributed.commit import FileRecord
from spotsafe.storage.base import Store


def init() -> tuple[int, int]:
    """Join the torchrun job over gloo (CPU); returns (rank, world_size)."""
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish() -> None:
    """Leave together: a rank whose peer already closed its sockets can abort in gloo's teardown."""
    dist.barrier()
    dist.destroy_process_group()


def out_dir() -> Path:
    path = Path(sys.argv[1])
    path.mkdir(parents=True, exist_ok=True)
    return path


def report(name: str, data: Any) -> None:
    """Write this rank's result where the test reads it (atomic rename)."""
    path = out_dir() / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def manifest_commit(store: Store, directory: str, step: int, world_size: int):  # type: ignore[no-untyped-def]
    """A commit callback writing a minimal manifest (the Checkpointer's stands in for it in the Run)."""

    def commit(files: list[FileRecord]) -> None:
        body = {
            "step": step,
            "world_size": world_size,
            "files": [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in files],
        }
        store.commit_file(f"{directory}/manifest.json", json.dumps(body).encode())

    return commit


def manifest_files(store: Store, directory: str) -> list[FileRecord]:
    body = json.loads(bytes(store.read_file(f"{directory}/manifest.json")))
    return [FileRecord(**f) for f in body["files"]]
