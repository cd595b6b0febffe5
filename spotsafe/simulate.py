"""``python -m spotsafe.simulate``: the metadata simulators and the rehearsal (see :mod:`spotsafe.rehearsal.cli`)."""

from __future__ import annotations

from spotsafe.rehearsal.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
