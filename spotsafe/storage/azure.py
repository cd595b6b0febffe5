"""Azure Blob Storage (``az://container/prefix``, ``abfs://``) on azure-storage-blob, with a real exclusive create.

:meth:`AzureBlobStore.create_file` (the writer lease's takeover) is one Put Blob with
``If-None-Match: *``: Azure refuses it (409 BlobAlreadyExists) when the blob exists, so of
several writers creating one generation exactly one wins. The first one on a store probes that
the server really refuses a second (:mod:`spotsafe.storage.s3_fence`). Everything else, the
limits on every call included, is :class:`~spotsafe.storage.blobs.BlobStore`.

Configured as the Azure tools are: ``AZURE_STORAGE_CONNECTION_STRING`` (azurite's included), or
an account (``AZURE_STORAGE_ACCOUNT_NAME`` or ``account_name=``) with its key, a SAS token, or
azure-identity's DefaultAzureCredential (managed identity, the CLI's login, ``AZURE_CLIENT_ID``...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from spotsafe.errors import StoreError, require
from spotsafe.storage.blobs import BlobStore, Missing, parse_url, tracking_session
from spotsafe.storage.buffers import BuffersReader, BytesReader, Into
from spotsafe.storage.remote import retryable_status

#: storage_options (adlfs's names).
_OPTIONS = frozenset({"connection_string", "account_name", "account_url", "account_key", "sas_token", "credential"})
CHECK_TIMEOUT = 5.0


class AzureBlobStore(BlobStore):
    """Checkpoints under ``az://container/prefix`` (``abfs://``, ``abfss://`` too).

    ``storage_options`` (adlfs's names): ``connection_string``, ``account_name``,
    ``account_url``, ``account_key``, ``sas_token``, ``credential``; and those of every blob
    store (``part_size``, ``max_concurrency``, ``connect_timeout``, ``read_timeout``,
    ``request_timeout``, ``min_throughput``, ``max_attempts``, ``unsafe_no_conditional_writes``):
    see docs/storage.md. Without any, ``AZURE_STORAGE_CONNECTION_STRING`` or
    ``AZURE_STORAGE_ACCOUNT_NAME`` (with DefaultAzureCredential) from the environment.
    """

    service = "Azure Blob"
    condition = "Put Blob with If-None-Match: *"
    remedy = "Azure Blob Storage or an emulator that honours If-None-Match (azurite)"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        opts = dict(storage_options or {})
        super().__init__(url, opts, _OPTIONS)
        _, container, self.prefix = parse_url(url, ("az", "abfs", "abfss"), "container")
        account = None
        if "@" in container:  # abfs://container@account.dfs.core.windows.net/path
            container, _, host = container.partition("@")
            account = host.split(".", 1)[0]
        self.container_name = container
        try:
            self._container = self._connect(opts, account)
            self._check_container()
        except BaseException:
            self.close()
            raise

    def _connect(self, opts: Mapping[str, Any], account: str | None) -> Any:
        require("azure.storage.blob", "azure")
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import ContainerClient

        transport = RequestsTransport(session=tracking_session(None, self.max_concurrency), session_owner=False)
        tuning: dict[str, Any] = {
            "transport": transport,
            "retry_total": 0,  # spotsafe retries itself, within each call's limit
            "connection_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_single_put_size": self.part_size,  # a segment: one Put Blob
            "max_block_size": self.part_size,
            "max_single_get_size": self.part_size + 1,  # a range and its check byte: one GET
            "max_chunk_get_size": self.part_size,
        }
        explicit = _OPTIONS - {"connection_string"}
        conn = opts.get("connection_string") or (
            None if explicit & set(opts) else os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        )
        try:
            if conn:
                client = ContainerClient.from_connection_string(conn, self.container_name, **tuning)
            else:
                account = opts.get("account_name") or account or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
                account_url = opts.get("account_url") or (account and f"https://{account}.blob.core.windows.net")
                if not account_url:
                    raise StoreError(
                        f"{self.url}: no Azure storage account: set AZURE_STORAGE_CONNECTION_STRING or "
                        "AZURE_STORAGE_ACCOUNT_NAME, or give storage_options account_name= or connection_string="
                    )
                credential = opts.get("credential") or opts.get("account_key") or opts.get("sas_token")
                if credential is None:
                    identity = require("azure.identity", "azure")
                    credential = identity.DefaultAzureCredential()
                client = ContainerClient(account_url, self.container_name, credential=credential, **tuning)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{self.url}: cannot create an Azure Blob client: {e}") from e
        self.endpoint = str(client.url).rsplit("/", 1)[0]
        return client

    def _check_container(self) -> None:
        from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError

        def get() -> None:
            connect, read = self.timeouts()
            self._container.get_container_properties(
                connection_timeout=min(connect, CHECK_TIMEOUT), read_timeout=min(read, CHECK_TIMEOUT)
            )

        try:
            self._call("GET container", get, attempts=2)
        except ResourceNotFoundError as e:
            raise StoreError(f"{self.url}: container {self.container_name!r} does not exist at {self.endpoint}") from e
        except ClientAuthenticationError as e:
            raise StoreError(
                f"{self.url}: access denied to container {self.container_name!r} ({e.status_code}): the credentials "
                "are invalid or lack read/write/list/delete on blobs; see docs/storage.md"
            ) from e
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{self.url}: cannot reach container {self.container_name!r}: {self._describe(e)}") from e

    def _timeouts(self) -> dict[str, float]:
        connect, read = self.timeouts()
        return {"connection_timeout": connect, "read_timeout": read}

    # ------------------------------------------------------------------ primitives

    def _list(self, prefix: str, delimited: bool) -> tuple[list[str], dict[str, int]]:
        dirs: list[str] = []
        files: dict[str, int] = {}
        if delimited:
            entries = self._container.walk_blobs(name_starts_with=prefix or None, delimiter="/", **self._timeouts())
        else:
            entries = self._container.list_blobs(name_starts_with=prefix or None, **self._timeouts())
        for entry in entries:
            if entry.name.endswith("/") and not hasattr(entry, "size"):
                dirs.append(entry.name)
            else:
                files[entry.name] = int(entry.size or 0)
        return dirs, files

    def _upload(self, key: str, body: BuffersReader, if_absent: bool) -> bool:
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        try:
            self._container.upload_blob(
                key, BytesReader(body), length=len(body), overwrite=not if_absent, max_concurrency=1, **self._timeouts()
            )
        except (ResourceExistsError, ResourceModifiedError):
            if if_absent:  # 409 BlobAlreadyExists, or 412 from a server that reads If-None-Match so
                return False
            raise
        return True

    def _download(self, key: str, dest: memoryview, start: int) -> int:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        into = Into(dest)
        try:
            stream = self._container.download_blob(
                key, offset=start, length=len(dest) + 1, max_concurrency=1, **self._timeouts()
            )
            stream.readinto(into)
        except ResourceNotFoundError as e:
            raise Missing(key) from e
        except HttpResponseError as e:
            if e.status_code == 416:
                return 0  # it ends before start
            raise
        return into.count

    def _size(self, key: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            props = self._container.get_blob_client(key).get_blob_properties(**self._timeouts())
        except ResourceNotFoundError:
            return None
        return int(props.size)

    def _delete(self, key: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._container.delete_blob(key, **self._timeouts())
        except ResourceNotFoundError:
            pass

    def _retryable(self, e: BaseException) -> bool:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        if isinstance(e, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
            return True
        if isinstance(e, HttpResponseError):
            return retryable_status(e.status_code)
        return type(e).__name__ in ("ProtocolError", "IncompleteRead", "ChunkedEncodingError")

    def _describe(self, e: BaseException) -> str:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        if isinstance(e, HttpResponseError):
            code = getattr(e, "error_code", None)
            code = f" {code}" if code else ""
            return f"HTTP {e.status_code}{code} from {self.endpoint}: {e.reason}"
        if isinstance(e, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
            return f"endpoint {self.endpoint} is unreachable or did not answer in time ({type(e).__name__}: {e})"
        return f"{type(e).__name__}: {e}"

    def close(self) -> None:
        super().close()
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
