"""``python -m spotsafe``: the ``spotsafe`` command (see :mod:`spotsafe.cli`)."""

from __future__ import annotations

from spotsafe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
