"""Google Cloud: the preemption notice of a Spot VM."""

from __future__ import annotations
