"""``python -m spotsafe``: the ``spotsafe`` command (see :mod:`spotsafe.cli.main`)."""

from __future__ import annotations

from spotsafe.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
