"""Azure: Scheduled Events (Preempt) of a Spot VM."""

from __future__ import annotations
