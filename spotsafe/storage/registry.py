"""From what a user wrote (a path, a URL, a :class:`~spotsafe.storage.base.Store`) to a store backend.

Backends are found by URL scheme in :data:`BACKENDS`, as fsspec's ``known_implementations``:
the built-in ones are named by module and class and imported on first use, so that an
optional dependency (boto3 for ``s3://``, google-cloud-storage for ``gs://``,
azure-storage-blob for ``az://``, fsspec for the rest) is needed only by whoever
opens such a store. :func:`register_store` adds a backend of one's own.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spotsafe.settings import Settings
from spotsafe.storage.base import Store
from spotsafe.storage.mirror import MirrorStore

#: What :func:`open_store` calls for a URL of its scheme: ``factory(url, storage_options)``.
StoreFactory = Callable[[str, Mapping[str, Any] | None], Store]


@dataclass(frozen=True)
class Backend:
    """A built-in backend, imported when a store of its scheme is first opened."""

    module: str
    name: str
    #: The class takes the path without its scheme, and no storage_options (a local directory).
    path_only: bool = False

    def __call__(self, url: str, storage_options: Mapping[str, Any] | None) -> Store:
        cls = getattr(importlib.import_module(self.module), self.name)
        store: Store
        if self.path_only:
            store = cls(url.split("://", 1)[1] if "://" in url else url)
        else:
            store = cls(url, storage_options=storage_options)
        return store


_LOCAL = Backend("spotsafe.storage.local", "LocalStore", path_only=True)
_S3 = Backend("spotsafe.storage.s3", "S3Store")
_GCS = Backend("spotsafe.storage.gcs", "GCSStore")
_AZURE = Backend("spotsafe.storage.azure", "AzureBlobStore")

#: The backend for any scheme not in :data:`BACKENDS` (``memory://``, ``hdfs://``, ...).
FSSPEC = Backend("spotsafe.storage.fsspec", "FsspecStore")

#: Backends by URL scheme (lower case; ``""``: a plain path).
BACKENDS: dict[str, StoreFactory] = {
    "": _LOCAL,
    "file": _LOCAL,
    "local": _LOCAL,
    "s3": _S3,
    "s3a": _S3,
    "gs": _GCS,
    "gcs": _GCS,
    "az": _AZURE,
    "abfs": _AZURE,
    "abfss": _AZURE,
}


def register_store(scheme: str, factory: StoreFactory) -> None:
    """Open URLs of ``scheme`` (``"myfs"`` for ``myfs://...``) with ``factory(url, storage_options)``.

    ``factory`` is called with the URL as the user wrote it and the ``storage_options``
    given to :func:`open_store` (or None), and returns a :class:`Store`: a Store subclass
    whose constructor takes ``(url, storage_options)`` will do. It replaces the backend
    the scheme had, a built-in one included.
    """
    key = scheme.lower()
    if not key or "://" in key or "/" in key:
        raise ValueError(f"{scheme!r} is not a URL scheme (give e.g. 'myfs' for myfs://...)")
    if not callable(factory):
        raise TypeError(f"the factory for {scheme}:// must be callable, not {factory!r}")
    BACKENDS[key] = factory


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
    - ``gs://`` gives the GCS store (``spotsafe[gcs]``), ``az://``/``abfs://`` the Azure Blob
      store (``spotsafe[azure]``): both with a native exclusive create for the writer lease;
    - a scheme given to :func:`register_store` gives that backend's store;
    - any other fsspec URL (``memory://``, ``hdfs://``, ...) gives the generic fsspec store;
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
        return MirrorStore(open_store(local), open_store(remote, storage_options=storage_options))
    if store is None:
        store = Settings.from_env().store
        if not store:
            raise ValueError(
                "no store given: pass a path or URL, or set SPOTSAFE_STORE "
                "(python -m spotsafe.resume --store does that)"
            )
    text = os.fspath(store)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return BACKENDS.get(scheme, FSSPEC)(text, storage_options)
