"""Checkpoints: the manifest, staging state to host memory, writing and reading files, the writer, the read-only catalog, in-memory snapshots, the writer lease."""

from __future__ import annotations
