"""The run's completion record: ``COMPLETE.json`` at the top of the store (``Run.finish``)."""

from __future__ import annotations

import json
from typing import Any

from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, FormatVersionError
from spotsafe.storage.base import Store

#: The run's completion record, at the top of the store (``Checkpointer.mark_complete``).
COMPLETE = "COMPLETE.json"


def read_completion(store: Store) -> dict[str, Any] | None:
    """The store's completion record, or None when the run has not finished.

    Raises :class:`CheckpointCorrupt` for a record that is not one, and
    :class:`FormatVersionError` for one newer than this spotsafe reads. Shared by the
    checkpointer and the report, which must not import torch.
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
    return doc
