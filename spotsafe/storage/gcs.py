"""Google Cloud Storage (``gs://bucket/prefix``) on google-cloud-storage, with a real exclusive create.

:meth:`GCSStore.create_file` (the writer lease's takeover) is one upload with
``ifGenerationMatch=0``: GCS refuses it with 412 when the object exists, so of several writers
creating one generation exactly one wins. The first one on a store probes that the server
really refuses a second (an emulator such as gcp-storage-emulator does not): see
:mod:`spotsafe.storage.s3_fence`. Everything else, the limits on every call included, is
:class:`~spotsafe.storage.blobs.BlobStore`.

Configured as the Google client libraries are: Application Default Credentials (the
environment's ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login, the VM's service account),
and ``STORAGE_EMULATOR_HOST`` for an emulator (then anonymous, unless credentials are given).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from spotsafe.errors import StoreError, require
from spotsafe.storage.blobs import BlobStore, Missing, parse_url, tracking_session
from spotsafe.storage.buffers import BuffersReader, BytesReader, Into
from spotsafe.storage.remote import retryable_status

#: storage_options (gcsfs's names): the project, and ``token`` (a service-account JSON file, or "anon").
_OPTIONS = frozenset({"project", "token", "credentials"})
#: The bucket check when the store opens: connect and read each bounded by this.
CHECK_TIMEOUT = 5.0


class GCSStore(BlobStore):
    """Checkpoints under ``gs://bucket/prefix``.

    ``storage_options``: ``project``, ``token`` (a service-account key file, or ``"anon"``),
    ``credentials`` (a google.auth credentials object), and those of every blob store:
    ``part_size`` (32 MiB), ``max_concurrency`` (16), ``connect_timeout`` (5 s),
    ``read_timeout`` (60 s), ``request_timeout`` (120 s), ``min_throughput`` (64 KiB/s),
    ``max_attempts`` (8), ``unsafe_no_conditional_writes`` (False): see docs/storage.md.
    """

    service = "GCS"
    condition = "upload with ifGenerationMatch=0"
    remedy = "Google Cloud Storage or an emulator that honours preconditions (fake-gcs-server)"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        opts = dict(storage_options or {})
        super().__init__(url, opts, _OPTIONS)
        _, self.bucket_name, self.prefix = parse_url(url, ("gs", "gcs"), "bucket")
        try:
            self._client, self._bucket = self._connect(opts)
            self._check_bucket()
        except BaseException:
            self.close()
            raise

    def _connect(self, opts: Mapping[str, Any]) -> tuple[Any, Any]:
        require("google.cloud.storage", "gcs")
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage  # type: ignore[attr-defined,import-untyped,unused-ignore]

        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        self.endpoint = emulator or "the GCS endpoint"
        credentials = opts.get("credentials")
        token = opts.get("token")
        project = opts.get("project")
        try:
            if credentials is None and (token == "anon" or (emulator and token is None)):
                credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
                project = project or "spotsafe"
            elif credentials is None and token is not None:
                from google.oauth2 import service_account

                credentials = service_account.Credentials.from_service_account_file(str(token))  # type: ignore[no-untyped-call]
            client = storage.Client(project=project, credentials=credentials)
        except DefaultCredentialsError as e:
            raise StoreError(
                f"{self.url}: no Google credentials found (GOOGLE_APPLICATION_CREDENTIALS, gcloud auth "
                f"application-default login, the VM's service account): {e}"
            ) from e
        except Exception as e:
            raise StoreError(f"{self.url}: cannot create a GCS client: {e}") from e
        tracking_session(
            client._http, self.max_concurrency
        )  # its connections join spotsafe's calls: the watchdog can cut them
        return client, client.bucket(self.bucket_name)

    def _check_bucket(self) -> None:
        from google.api_core import exceptions as gexc

        def get() -> None:
            connect, read = self.timeouts()
            self._client.get_bucket(
                self.bucket_name, timeout=(min(connect, CHECK_TIMEOUT), min(read, CHECK_TIMEOUT)), retry=None
            )

        try:
            self._call("GET bucket", get, attempts=2)
        except gexc.NotFound as e:
            raise StoreError(f"{self.url}: bucket {self.bucket_name!r} does not exist at {self.endpoint}") from e
        except (gexc.Forbidden, gexc.Unauthorized) as e:
            raise StoreError(
                f"{self.url}: access denied to bucket {self.bucket_name!r} ({e.code}): the credentials are "
                "invalid or lack storage.buckets.get; see docs/storage.md for the permissions spotsafe needs"
            ) from e
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{self.url}: cannot reach bucket {self.bucket_name!r}: {self._describe(e)}") from e

    # ------------------------------------------------------------------ primitives

    def _list(self, prefix: str, delimited: bool) -> tuple[list[str], dict[str, int]]:
        pages = self._client.list_blobs(
            self.bucket_name,
            prefix=prefix or None,
            delimiter="/" if delimited else None,
            timeout=self.timeouts(),
            retry=None,
        )
        files = {blob.name: int(blob.size or 0) for blob in pages}
        return sorted(pages.prefixes), files

    def _upload(self, key: str, body: BuffersReader, if_absent: bool) -> bool:
        from google.api_core import exceptions as gexc

        conditions = {"if_generation_match": 0} if if_absent else {}
        try:
            self._bucket.blob(key).upload_from_file(
                BytesReader(body),
                size=len(body),
                rewind=False,
                checksum=None,  # the manifest carries a checksum of every file; loads verify it
                timeout=self.timeouts(),
                retry=None,
                **conditions,
            )
        except gexc.PreconditionFailed:
            if if_absent:
                return False
            raise
        return True

    def _download(self, key: str, dest: memoryview, start: int) -> int:
        from google.api_core import exceptions as gexc

        into = Into(dest)
        try:
            self._bucket.blob(key).download_to_file(
                into,
                start=start,
                end=start + len(dest),  # one byte past: the object's size must be what the caller expects
                raw_download=True,
                checksum=None,
                timeout=self.timeouts(),
                retry=None,
            )
        except gexc.NotFound as e:
            raise Missing(key) from e
        except gexc.RequestRangeNotSatisfiable:
            return 0  # it ends before start
        return into.count

    def _size(self, key: str) -> int | None:
        blob = self._bucket.get_blob(key, timeout=self.timeouts(), retry=None)
        return None if blob is None else int(blob.size or 0)

    def _delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            self._bucket.blob(key).delete(timeout=self.timeouts(), retry=None)
        except gexc.NotFound:
            pass

    def _retryable(self, e: BaseException) -> bool:
        from google.api_core import exceptions as gexc

        if isinstance(e, gexc.GoogleAPICallError):
            return retryable_status(e.code)
        return _transport_error(e)

    def _describe(self, e: BaseException) -> str:
        from google.api_core import exceptions as gexc

        if isinstance(e, gexc.GoogleAPICallError):
            return f"HTTP {e.code} from {self.endpoint}: {e.message}"
        if _transport_error(e):
            return f"endpoint {self.endpoint} is unreachable or did not answer in time ({type(e).__name__}: {e})"
        return f"{type(e).__name__}: {e}"

    def close(self) -> None:
        super().close()
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()


def _transport_error(e: BaseException) -> bool:
    """A connection that failed, dropped or timed out (requests', urllib3's, google.auth's, the socket's)."""
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return True
    return type(e).__name__ in ("TransportError", "ProtocolError", "IncompleteRead")
