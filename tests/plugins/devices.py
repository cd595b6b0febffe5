"""Block devices for tests, as fixtures (registered in tests/conftest.py).

- ``loopdev`` (function): a factory of loop devices over sparse files in tmp_path; only for
  ``@pytest.mark.root`` tests (the marker's hook in conftest skips them where root or the
  tools are missing).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spotsafe.cloud.aws.volume.filesystem import mountpoints_of


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: a loop device over a sparse file in tmp_path. Teardown unmounts and frees them.

    Only for ``@pytest.mark.root`` tests: the marker's hook in conftest skips them where
    root or the tools are missing."""
    made: list[str] = []

    def make(size_mb: int = 16, name: str = "disk") -> str:
        img = tmp_path / f"{name}-{len(made)}.img"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"losetup failed (no loop devices?): {p.stderr.strip()}")
        dev = p.stdout.strip()
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in made:
            try:
                for mp in mountpoints_of(dev):
                    subprocess.run(["umount", "-l", mp], check=False)
            except OSError:
                pass
            subprocess.run(["losetup", "-d", dev], check=False)
