"""The run's story: its events in the store, the facts and cost drawn from them, the HTML report and the live page."""

from __future__ import annotations
