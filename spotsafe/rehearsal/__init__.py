"""Rehearsing an interruption: metadata simulators of the three clouds and the whole-interruption rehearsal."""

from __future__ import annotations
