"""The installed spotsafe's version (recorded in every manifest and launch event)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("spotsafe")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
