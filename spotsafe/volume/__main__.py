"""``python -m spotsafe.volume``: see :mod:`spotsafe.cloud.aws.volume.cli`."""

from __future__ import annotations

from spotsafe.cloud.aws.volume.cli import main

raise SystemExit(main())
