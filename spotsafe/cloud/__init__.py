"""The clouds: the interruption watcher and what every cloud shares; one subpackage per cloud (``aws``, ``gcp``, ``azure``)."""

from __future__ import annotations
