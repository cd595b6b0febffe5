"""``python -m spotsafe.volume``: see :mod:`spotsafe.volume.cli`."""

from __future__ import annotations

from spotsafe.volume.cli import main

raise SystemExit(main())
