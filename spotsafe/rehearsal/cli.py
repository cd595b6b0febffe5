"""``python -m spotsafe.simulate`` and ``spotsafe simulate``: ``rehearse ...`` runs a rehearsal
(:mod:`spotsafe.rehearsal.rehearse`), anything else serves a simulator (:mod:`spotsafe.rehearsal.simulators.serve`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from spotsafe.rehearsal import rehearse
from spotsafe.rehearsal.simulators import serve


def main(argv: Sequence[str] | None = None) -> int:
    """``rehearse ...`` runs a rehearsal, anything else a simulator."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "rehearse":
        return int(rehearse.main(args[1:]) or 0)
    return int(serve.main(args) or 0)
