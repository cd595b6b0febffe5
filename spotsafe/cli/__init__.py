"""The ``spotsafe`` command, one module per family of subcommands."""

from __future__ import annotations
