"""The command line of ``python -m spotsafe.cloud.gcp.finish`` and ``spotsafe.cloud.azure.finish``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from spotsafe.errors import LaunchError

T = TypeVar("T")


def finish_main(
    prog: str, description: str, finish: Callable[[], T], done: Callable[[T], str], argv: Sequence[str] | None
) -> int:
    """Parse (no options), run ``finish``; 0 with ``done(target)`` on stderr, 1 with the error."""
    argparse.ArgumentParser(prog=prog, description=description).parse_args(argv)
    try:
        target = finish()
    except LaunchError as e:
        print(f"spotsafe finish: {e}", file=sys.stderr)
        return 1
    print(done(target), file=sys.stderr)
    return 0
