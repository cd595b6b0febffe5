"""Whether an S3 server honours conditional writes, found out once per store (the writer lease rests on it).

The writer lease (:mod:`spotsafe.checkpoint.lease`) takes a store over by creating the next
generation's file with a PUT carrying ``If-None-Match: *``. AWS S3 (since 2024), recent MinIO
and moto refuse such a PUT when the key exists; some S3-compatible servers (and older versions
of popular ones) answer 200 and overwrite, so two writers racing for one generation would both
win, silently. :class:`ConditionalWrites` probes it before the first create: it puts a unique
object under ``lease/`` with the header, puts it again, and deletes it, whatever came of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from spotsafe.errors import StoreError

log = logging.getLogger(__name__)

#: The storage option that turns the refusal into a warning and best-effort fencing.
UNSAFE_OPTION = "unsafe_no_conditional_writes"
#: Where the probe's object goes (the lease's directory; its names never match a generation's).
PROBE_PREFIX = "lease/.probe-"

#: ``put_if_absent(path, data)``: True when written, False when the key exists, None when the
#: server has no conditional writes at all (it answered 501).
PutIfAbsent = Callable[[str, bytes], "bool | None"]


class ConditionalWrites:
    """One store's knowledge of its server: ``honoured`` is None until :meth:`probe` ran."""

    def __init__(self, url: str, endpoint: str, *, unsafe: bool) -> None:
        self.url = url
        self.endpoint = endpoint
        self.unsafe = unsafe
        self.honoured: bool | None = None

    def unsupported(self) -> None:
        """The server answered 501 to ``If-None-Match``: it cannot fence; refused unless ``unsafe``.

        It says so itself, so the refusal needs no probe; with the opt-out, a warning and
        best-effort fencing, as for a server the probe caught.
        """
        self.honoured = False
        cause = f"the server at {self.endpoint} does not support conditional writes (501 to If-None-Match: *)"
        if not self.unsafe:
            raise StoreError(
                f"{self.url}: {cause}, so two writers could both take the writer lease. Use a server that "
                f"honours If-None-Match (AWS S3, recent MinIO), or, when only one instance ever writes here, open "
                f'the store with storage_options={{"{UNSAFE_OPTION}": True}} (docs/storage.md, writer fencing)'
            )
        log.warning("%s: %s; %s is set: writer fencing is best effort here", self.url, cause, UNSAFE_OPTION)

    def probe(self, put_if_absent: PutIfAbsent, delete: Callable[[str], None]) -> None:
        """Two conditional PUTs of one new key and a DELETE; raise StoreError when the second was accepted.

        With ``unsafe`` (the storage option :data:`UNSAFE_OPTION`) it warns instead, and the
        store fences best effort (:meth:`spotsafe.storage.base.Store.create_file`).
        """
        path = f"{PROBE_PREFIX}{os.urandom(8).hex()}"
        try:
            if put_if_absent(path, b"spotsafe conditional-write probe") is None:
                return  # a 501: unsupported() has set honoured and warned
            second = put_if_absent(path, b"spotsafe conditional-write probe, again")
        finally:
            delete(path)
        if second is None:
            return
        self.honoured = second is False
        if self.honoured:
            return
        cause = (
            f"the server at {self.endpoint} accepted a second PUT with If-None-Match: * of the same key: "
            "it ignores conditional writes, so two writers could both take the writer lease"
        )
        if not self.unsafe:
            raise StoreError(
                f"{self.url}: {cause}. Use a server that honours If-None-Match (AWS S3, recent MinIO), "
                f'or, when only one instance ever writes here, open the store with storage_options={{"{UNSAFE_OPTION}": '
                "True}} (docs/storage.md, writer fencing)"
            )
        log.warning("%s: %s; %s is set: writer fencing is best effort here", self.url, cause, UNSAFE_OPTION)
