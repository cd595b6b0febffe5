"""``spotsafe launch``/``status``/``down``/``price``: a run as a one-instance spot Auto Scaling group."""

from __future__ import annotations
