"""From what a user wrote (a path, a URL, a :class:`~spotsafe.storage.base.Store`) to a store backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from spotsafe.storage.base import Store


def open_store(
    store: str | os.PathLike[str] | Store | None = None,
    *,
    local: str | os.PathLike[str] | None = None,
    remote: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Turn what a user wrote into a :class:`Store`.

    - a :class:`Store` is returned as it is;
    - a plain path or ``file://`` URL gives a local directory store (atomic rename commit);
    - ``s3://`` gives the S3 store (checkpoint data as parallel single-PUT segments,
      needs ``spotsafe[s3]``);
    - any other fsspec URL (``gs://``, ``memory://``, ...) gives the generic fsspec store;
    - ``local=`` and ``remote=`` together give a mirror: commit locally, upload in the background;
    - nothing at all falls back to the ``SPOTSAFE_STORE`` environment variable.
    """
    if isinstance(store, Store):
        return store
    if local is not None or remote is not None:
        if store is not None:
            raise ValueError("give either a store or local=/remote=, not both")
        if local is None or remote is None:
            raise ValueError("a mirror needs both local= and remote=")
        from spotsafe.storage.mirror import MirrorStore

        return MirrorStore(open_store(local), open_store(remote, storage_options=storage_options))
    if store is None:
        from spotsafe.settings import Settings

        store = Settings.from_env().store
        if not store:
            raise ValueError(
                "no store given: pass a path or URL, or set SPOTSAFE_STORE "
                "(python -m spotsafe.resume --store does that)"
            )
    text = os.fspath(store)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("", "file", "local"):
        from spotsafe.storage.local import LocalStore

        path = text.split("://", 1)[1] if scheme else text
        return LocalStore(path)
    if scheme in ("s3", "s3a"):
        from spotsafe.storage.s3 import S3Store

        return S3Store(text, storage_options=storage_options)
    from spotsafe.storage.fsspec import FsspecStore

    return FsspecStore(text, storage_options=storage_options)
