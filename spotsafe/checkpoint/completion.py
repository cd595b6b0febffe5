"""The run's completion record: ``COMPLETE.json`` at the top of the store (``Run.finish``)."""

from __future__ import annotations

import json
import logging
from typing import Any

from spotsafe.checkpoint.lease import is_ghost, takeovers
from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, FormatVersionError, SpotsafeError
from spotsafe.storage.base import Store

log = logging.getLogger(__name__)

#: The run's completion record, at the top of the store (``Checkpointer.mark_complete``).
COMPLETE = "COMPLETE.json"


def read_completion(store: Store) -> dict[str, Any] | None:
    """The store's completion record, or None when the run has not finished.

    Raises :class:`CheckpointCorrupt` for a record that is not one, and
    :class:`FormatVersionError` for one newer than this spotsafe reads. Shared by the
    checkpointer and the report, which must not import torch.

    A record carries its writer's generation: one written by a superseded writer after a
    newer generation took the store over (the ghost rule of :mod:`spotsafe.checkpoint.lease`:
    its step above the newer one's base step) does not count: the run goes on there.
    """
    where = f"{store.url.rstrip('/')}/{COMPLETE}"
    try:
        data = store.read_file(COMPLETE)
    except CheckpointNotFound:
        return None
    try:
        doc = json.loads(bytes(data))
    except ValueError as e:
        raise CheckpointCorrupt(f"{where}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != "spotsafe-complete":
        raise CheckpointCorrupt(f"{where}: not a spotsafe completion record")
    if doc.get("format_version", 0) > 1:
        raise FormatVersionError(
            f"{where}: completion format version {doc['format_version']} is newer than supported (1)"
        )
    generation, step = doc.get("generation"), doc.get("step")
    if isinstance(generation, int) and isinstance(step, int):
        try:
            later = takeovers(store, generation)
        except SpotsafeError as e:
            log.warning("spotsafe: cannot read the writer leases of %s: %s", store.url, e)
            later = []
        if is_ghost(generation, step, later):
            log.warning(
                "spotsafe: ignoring %s: written by writer generation %d after a newer one took the store over",
                where,
                generation,
            )
            return None
    return doc
