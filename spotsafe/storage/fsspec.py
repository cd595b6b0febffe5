"""A store on any fsspec filesystem (``gs://``, ``az://``, ``memory://``, ``file://``...).

S3 has its own, faster backend (:mod:`spotsafe.storage.s3`); this one is the
general fallback. It keeps the commit protocol with what every fsspec filesystem
offers: data files are streamed with ``open("wb")`` (discarded and removed on
failure), and the manifest is one ``pipe_file`` (a single PUT on object stores).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from spotsafe.errors import CheckpointNotFound, MissingDependency, StoreError
from spotsafe.storage.base import Buffer, Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class FsspecStore(Store):
    """Checkpoints under any fsspec URL; ``storage_options`` go to the filesystem."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        import fsspec.core

        self.url = url.rstrip("/")
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        except ImportError as e:
            raise MissingDependency(f"{self.url}: {e}") from e
        except ValueError as e:  # unknown protocol
            raise StoreError(f"{self.url}: {e}") from e
        self.fs = fs
        self.root = root.rstrip("/")

    def _full(self, path: str) -> str:
        path = path.strip("/")
        return f"{self.root}/{path}" if path else self.root

    def _where(self, path: str) -> str:
        return f"{self.url}/{path}" if path else self.url

    def _invalidate(self, path: str = "") -> None:
        # Object-store filesystems (s3fs, gcsfs) cache listings; a store must see the truth.
        try:
            self.fs.invalidate_cache(self._full(path))
        except Exception:  # noqa: BLE001, S110 - a filesystem without a cache has nothing to drop
            pass

    def listdir(self, path: str = "") -> list[str]:
        full = self._full(path)
        self._invalidate(path)
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StoreError(f"{self._where(path)}: listing failed: {e}") from e
        names = set()
        for entry in entries:
            name = self.fs._strip_protocol(entry).rstrip("/").rsplit("/", 1)[-1]
            if name and self.fs._strip_protocol(entry).rstrip("/") != full:
                names.add(name)
        return sorted(names)

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        full = self._full(path)
        parent = full.rsplit("/", 1)[0] if "/" in full else ""
        try:
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            f = self.fs.open(full, "wb")
        except Exception as e:
            raise StoreError(f"{self._where(path)}: cannot open for writing: {e}") from e
        try:
            for b in buffers:
                view = memoryview(b)
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
                f.write(view)
        except BaseException as e:
            # Never let a half-written file stand as if it were whole.
            discard = getattr(f, "discard", None)
            try:
                if callable(discard):
                    discard()
                else:
                    f.close()
            except Exception:  # noqa: BLE001, S110 - the write's own error is the one to raise
                pass
            self._remove_quietly(full)
            if isinstance(e, Exception):
                raise StoreError(f"{self._where(path)}: write failed: {e}") from e
            raise
        try:
            f.close()
        except Exception as e:
            self._remove_quietly(full)
            raise StoreError(f"{self._where(path)}: write failed: {e}") from e
        self._invalidate(path)

    def _remove_quietly(self, full: str) -> None:
        try:
            if self.fs.exists(full):
                self.fs.rm_file(full)
        except Exception as e:  # noqa: BLE001 - best effort; the manifest check catches the rest
            log.warning("%s: could not remove partial file %s: %s", self.url, full, e)

    def commit_file(self, path: str, data: bytes) -> None:
        full = self._full(path)
        parent = full.rsplit("/", 1)[0] if "/" in full else ""
        try:
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(full, bytes(data))
        except Exception as e:
            raise StoreError(f"{self._where(path)}: commit failed: {e}") from e
        self._invalidate(path)

    def read_file(self, path: str) -> memoryview:
        try:
            data = self.fs.cat_file(self._full(path))
        except FileNotFoundError as e:
            raise CheckpointNotFound(f"{self._where(path)}: no such file") from e
        except IsADirectoryError as e:
            raise CheckpointNotFound(f"{self._where(path)}: is a directory, not a file") from e
        except Exception as e:
            raise StoreError(f"{self._where(path)}: read failed: {e}") from e
        return memoryview(data).toreadonly()

    def file_size(self, path: str) -> int | None:
        self._invalidate(path)
        try:
            info = self.fs.info(self._full(path))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise StoreError(f"{self._where(path)}: stat failed: {e}") from e
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    def delete_dir(self, path: str) -> None:
        full = self._full(path)
        if not path.strip("/"):
            raise ValueError(f"{self.url}: refusing to delete the whole store")
        try:
            manifest = f"{full}/{MANIFEST}"
            if self.fs.exists(manifest):  # first: never a half-deleted "complete" checkpoint
                self.fs.rm_file(manifest)
            if self.fs.exists(full):
                self.fs.rm(full, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise StoreError(f"{self._where(path)}: delete failed: {e}") from e
        self._invalidate(path)
