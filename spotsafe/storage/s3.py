"""S3 (and S3-compatible: MinIO, Ceph, R2...) store on boto3, built for large checkpoints.

- Checkpoint payloads go up as segments of ``part_size`` bytes (``segment_size``),
  each a single PUT, in parallel, straight from the caller's buffers (memoryviews: no
  copy, no temp file); :meth:`S3Store.write_files`. No multipart upload is involved, so
  a writer killed mid-save leaves plain objects without a manifest, nothing to abort.
- A single large file (a mirror's upload, a DCP shard) written with ``write_file``
  goes up as a parallel multipart upload of the same slices; any failure aborts it,
  so no half-written object and no billed debris is left.
- Reads are parallel ranged GETs straight into one preallocated buffer, all pinned to
  the same object version with ``If-Match``.
- Every call has explicit connect/read timeouts per socket operation, and a limit on
  the whole call, all its attempts and its streamed body included (``request_timeout``
  plus the bytes it moves at ``min_throughput``; the preemption notice's deadline given
  to :meth:`S3Store.set_deadline` when that is sooner): a watchdog thread shuts the
  socket of an overdue call, so an endpoint that trickles bytes cannot hold a thread.
  Throttling (503 SlowDown), 500s, timeouts and dropped connections are retried with
  jittered exponential backoff within that limit. That machinery is :mod:`spotsafe.storage.s3_calls`.
- The bucket is checked at construction (one HEAD): a missing bucket, missing credentials, a
  denied access or an unreachable endpoint is a clear StoreError naming the URL, not a hang.

Credentials come from boto3's standard chain (environment, profile, instance role).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from typing import Any

from spotsafe.errors import CheckpointCorrupt, CheckpointNotFound, StoreError, require
from spotsafe.storage.base import MAX_MANIFEST_BYTES, Buffer, anonymous_buffer
from spotsafe.storage.buffers import BuffersReader, as_bytes_views
from spotsafe.storage.remote import RemoteStore
from spotsafe.storage.s3_calls import describe_error, error_code, is_retryable, track_connections
from spotsafe.storage.s3_fence import UNSAFE_OPTION, ConditionalWrites

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: S3's limits on multipart uploads.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: Bytes per socket read on download.
READ_CHUNK = 8 * MiB
#: A checkpoint's manifest: refused from its HEAD when larger than MAX_MANIFEST_BYTES.
MANIFEST = "manifest.json"
#: The bucket check when the store opens: connect and read each bounded by this (and
#: by connect_timeout/read_timeout when lower), one attempt on a timeout, so an endpoint
#: that accepts connections and never answers fails in seconds, not 2 x read_timeout.
CHECK_TIMEOUT = 5.0

#: storage_options keys understood here besides the limits of every remote store (s3fs's names where s3fs has one).
_OPTIONS = frozenset(
    ("endpoint_url", "region_name", "client_kwargs", "config_kwargs", "key", "secret", "token", "profile", "anon")
) | {UNSAFE_OPTION}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("s3", "s3a"):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name in the URL (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


#: How many times a read starts over when the object was replaced between its HEAD and a GET.
_REREADS = 4


class _Replaced(Exception):
    """The object changed between the HEAD and a ranged GET pinned to the HEAD's ETag."""


class S3Store(RemoteStore):
    """Checkpoints under ``s3://bucket/prefix``.

    ``storage_options`` (s3fs's names where s3fs has one):

    - ``endpoint_url``, ``region_name``: for MinIO-style endpoints and regions;
    - ``client_kwargs``: passed to ``boto3 client("s3", ...)`` (``endpoint_url``, ``verify``...);
    - ``config_kwargs``: passed to ``botocore.config.Config``;
    - ``key``, ``secret``, ``token``, ``profile``, ``anon``: credentials, when not from the chain;
    - ``part_size`` (bytes, default 32 MiB), ``max_concurrency`` (default 16): multipart tuning;
    - ``connect_timeout`` (5 s), ``read_timeout`` (60 s): each socket connect / read;
    - ``request_timeout`` (120 s), ``min_throughput`` (64 KiB/s): each whole call, all its
      attempts and its body included, gets ``request_timeout + bytes / min_throughput``
      (a 32 MiB part: 632 s), or less when the deadline given to :meth:`set_deadline` is
      sooner; past it the call's socket is shut and it raises
      :class:`~spotsafe.errors.StoreError` naming the key, the endpoint and the limit;
    - ``max_attempts`` (8): tries per call on transient errors;
    - ``unsafe_no_conditional_writes`` (False): on a server that ignores ``If-None-Match``
      (found by :meth:`create_file`'s probe), warn and fence best effort instead of refusing.
    """

    verifies_exclusive_create = True  # the conditional-write probe (spotsafe.storage.s3_fence)
    min_part_size = MIN_PART_SIZE  # S3's own minimum for a multipart upload's part
    min_part_reason = f"below S3's minimum of {MIN_PART_SIZE} bytes"
    thread_prefix = "spotsafe-s3"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.bucket, self.prefix = parse_s3_url(url)
        opts = dict(storage_options or {})
        super().__init__(url, opts, _OPTIONS)
        self._own_uploads: set[str] = set()
        self._warned_uploads = False
        self._lock = threading.Lock()
        self._created = datetime.now(timezone.utc)
        try:
            self._client, self._data_client, check_client = self._make_clients(opts)
        except BaseException:
            self.close()
            raise
        self._conditional = ConditionalWrites(self.url, self.endpoint, unsafe=bool(opts.get(UNSAFE_OPTION, False)))
        self._interruptible = all(
            track_connections(c, self.url) for c in (self._client, self._data_client, check_client)
        )
        try:
            self._check_bucket(check_client)
        except BaseException:
            self.close()
            raise
        finally:
            check_client.close()

    def _make_clients(self, opts: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        """The store's boto3 clients: for every call, for data uploads, for the bucket check (sets ``endpoint``).

        The data client sends payloads unsigned (``UNSIGNED-PAYLOAD``): botocore otherwise hashes
        every byte with SHA-256 to sign it (over http, and over https when no checksum header is
        sent, as here): 0.7 s of CPU per GiB on this VM (hashlib, 1.5 GB/s a core), beside a
        training step or the S3 server itself. What a data object holds is checked on load against
        the manifest's xxh3 checksums; manifests, lease records and every other call stay signed.
        ``config_kwargs={"s3": {"payload_signing_enabled": True}}`` signs the data too.
        """
        boto3 = require("boto3", "s3")
        from botocore import UNSIGNED
        from botocore.config import Config

        client_kwargs = dict(opts.get("client_kwargs") or {})
        for name in ("endpoint_url", "region_name"):
            if opts.get(name) is not None:
                client_kwargs.setdefault(name, opts[name])
        config_kwargs: dict[str, Any] = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            # spotsafe retries itself (bounded by the notice deadline), so botocore does not.
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": self.max_concurrency + 4,
            # The manifest carries a checksum of every file and loads verify it; a second
            # CRC pass over every byte on upload would only slow the save down.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if client_kwargs.get("endpoint_url") or env_endpoint:
            # MinIO, moto, s3rver...: a bare host[:port] has no bucket subdomains.
            config_kwargs["s3"] = {"addressing_style": "path"}
        if opts.get("anon"):
            config_kwargs["signature_version"] = UNSIGNED
        config_kwargs.update(opts.get("config_kwargs") or {})
        self.endpoint = client_kwargs.get("endpoint_url") or env_endpoint or "the AWS S3 endpoint"
        try:
            session = boto3.session.Session(
                aws_access_key_id=opts.get("key"),
                aws_secret_access_key=opts.get("secret"),
                aws_session_token=opts.get("token"),
                profile_name=opts.get("profile"),
            )
            client = session.client("s3", config=Config(**config_kwargs), **client_kwargs)
            check_config = Config(**config_kwargs).merge(
                Config(
                    connect_timeout=min(config_kwargs["connect_timeout"], CHECK_TIMEOUT),
                    read_timeout=min(config_kwargs["read_timeout"], CHECK_TIMEOUT),
                )
            )
            check_client = session.client("s3", config=check_config, **client_kwargs)
            s3_config = dict(config_kwargs.get("s3") or {})
            s3_config.setdefault("payload_signing_enabled", False)
            data_client = session.client("s3", config=Config(**{**config_kwargs, "s3": s3_config}), **client_kwargs)
        except Exception as e:  # bad profile, bad region, bad endpoint URL...
            raise StoreError(f"{self.url}: cannot create an S3 client: {e}") from e
        return client, data_client, check_client

    # ------------------------------------------------------------------ helpers

    def _retryable(self, e: BaseException) -> bool:
        return is_retryable(e)

    def _describe(self, e: BaseException) -> str:
        return describe_error(e, self.endpoint)

    def _check_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError, NoCredentialsError, ReadTimeoutError

        def head() -> Any:
            try:
                return client.head_bucket(Bucket=self.bucket)
            except ReadTimeoutError as e:  # connected, no answer: not worth a second wait
                raise _Silent(str(e)) from e

        try:
            self._call("HEAD bucket", head, attempts=2)
        except _Silent as e:
            raise StoreError(
                f"{self.url}: {self.endpoint} accepted the connection but did not answer within "
                f"{client.meta.config.read_timeout:g} s"
            ) from e
        except NoCredentialsError as e:
            raise StoreError(
                f"{self.url}: no AWS credentials found (looked in the environment, "
                "the shared config/credentials files and the instance role); set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or attach a role"
            ) from e
        except ClientError as e:
            code = error_code(e)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"{self.url}: bucket {self.bucket!r} does not exist at {self.endpoint}") from e
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(
                    f"{self.url}: access denied to bucket {self.bucket!r} (HTTP 403): the "
                    "credentials are invalid or lack s3:ListBucket; see docs/storage.md "
                    "for the permissions spotsafe needs"
                ) from e
            raise StoreError(f"{self.url}: cannot reach bucket {self.bucket!r}: {e}") from e
        except Exception as e:
            raise StoreError(f"{self.url}: {describe_error(e, self.endpoint)}") from e

    # ------------------------------------------------------------------ reads

    def _pages(self, prefix: str, *, delimited: bool) -> Iterator[dict[str, Any]]:
        """``ListObjectsV2`` pages under ``prefix`` (one level when ``delimited``)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimited:
            kwargs["Delimiter"] = "/"
        while True:
            page: dict[str, Any] = self._call(f"LIST {prefix or '/'}", self._client.list_objects_v2, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def listdir(self, path: str = "") -> list[str]:
        prefix = self._dir_key(path)
        names: set[str] = set()
        try:
            for page in self._pages(prefix, delimited=True):
                for cp in page.get("CommonPrefixes", ()):
                    names.add(cp["Prefix"][len(prefix) :].rstrip("/"))
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(prefix) :]
                    if name:
                        names.add(name)
        except Exception as e:
            raise self._error(path, "listing", e) from e
        return sorted(names)

    def _head(self, path: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            key = self._key(path)
            head: dict[str, Any] = self._call(f"HEAD {key}", self._client.head_object, Bucket=self.bucket, Key=key)
            return head
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(path, "HEAD", e) from e
        except Exception as e:
            raise self._error(path, "HEAD", e) from e

    def file_size(self, path: str) -> int | None:
        head = self._head(path)
        return None if head is None else int(head["ContentLength"])

    def file_sizes(self, path: str) -> dict[str, int]:
        prefix = self._dir_key(path)
        sizes: dict[str, int] = {}
        try:
            for page in self._pages(prefix, delimited=True):
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(prefix) :]
                    if name:
                        sizes[name] = int(obj["Size"])
        except Exception as e:
            raise self._error(path, "listing", e) from e
        return sizes

    def read_files_into(self, items: Sequence[tuple[str, memoryview]]) -> None:
        # No HEAD per file: every range asks for its bytes and the server's Content-Range
        # says how big the object is, which must be len(dest).
        tasks: list[Callable[[], Any]] = []
        for path, dest in items:
            size = len(dest)
            if size == 0:
                tasks.append(partial(self._check_empty, path))
            for start in range(0, size, self.part_size):
                tasks.append(partial(self._get_range, path, None, dest, start, min(start + self.part_size, size), size))
        self._read_all(items, tasks)

    def _check_empty(self, path: str) -> None:
        size = self.file_size(path)
        if size is None:
            raise CheckpointNotFound(f"{self._where(path)}: no such object")
        if size:
            raise CheckpointCorrupt(f"{self._where(path)}: {size} bytes, expected 0")

    def read_file(self, path: str) -> memoryview:
        for _ in range(_REREADS):
            try:
                return self._read_version(path)
            except _Replaced:
                continue  # replaced between the HEAD and a GET (a lease record renewed): read the new one
        return self._read_version(path, last=True)

    def _read_version(self, path: str, *, last: bool = False) -> memoryview:
        """One version of ``path``: the HEAD's, every range pinned to it (If-Match); _Replaced when it changed."""
        head = self._head(path)
        if head is None:
            raise CheckpointNotFound(f"{self._where(path)}: no such object")
        size = int(head["ContentLength"])
        if size > MAX_MANIFEST_BYTES and path.rpartition("/")[2] == MANIFEST:
            # Refused from the HEAD, as the local store refuses one from its size: the
            # ranges below come from this size and are pinned to this version (If-Match).
            raise CheckpointCorrupt(
                f"{self._where(path)}: {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES}); not downloaded"
            )
        etag = head.get("ETag")
        # Anonymous memory: the kernel zeroes pages as the download threads first touch
        # them, in parallel with the network, instead of bytearray zeroing it all up front.
        view = anonymous_buffer(size, huge_pages=False)  # filled at once by the downloads
        ranges = [(start, min(start + self.part_size, size)) for start in range(0, size, self.part_size)]
        try:
            if len(ranges) <= 1:
                if size:
                    self._get_range(path, etag, view, 0, size)
            else:
                self._run_parallel([partial(self._get_range, path, etag, view, start, end) for start, end in ranges])
        except (CheckpointNotFound, CheckpointCorrupt):
            raise
        except Exception as e:
            if not last and error_code(e) in ("PreconditionFailed", "412"):
                raise _Replaced from e
            raise self._error(path, "download", e) from e
        # Writable on purpose: the buffer is private to the caller, so tensors can be built
        # on it without a copy (a read-only one would be cloned by the loader).
        return view

    def _get_range(
        self, path: str, etag: str | None, view: memoryview, start: int, end: int, expect: int | None = None
    ) -> None:
        """Read bytes ``[start, end)`` of ``path`` into ``view[start:end]``.

        ``expect``: the object's whole size, checked against the answer's Content-Range.
        """
        from botocore.exceptions import ClientError

        def once() -> None:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self._key(path),
                "Range": f"bytes={start}-{end - 1}",
            }
            if etag:
                kwargs["IfMatch"] = etag  # every range from the same version of the object
            try:
                response = self._client.get_object(**kwargs)
            except ClientError as e:
                if expect is not None and error_code(e) in ("404", "NoSuchKey", "NotFound"):
                    raise CheckpointNotFound(f"{self._where(path)}: no such object") from e
                if expect is not None and error_code(e) in ("416", "InvalidRange"):
                    raise CheckpointCorrupt(f"{self._where(path)}: shorter than the {expect} bytes expected") from e
                raise
            body = response["Body"]
            got = int(response.get("ContentLength", -1))
            if expect is not None:
                total = str(response.get("ContentRange", "")).rpartition("/")[2]
                if (total.isdigit() and int(total) != expect) or got != end - start:
                    body.close()
                    size = total if total.isdigit() else "?"
                    raise CheckpointCorrupt(f"{self._where(path)}: {size} bytes, expected {expect}")
            elif got != end - start:  # never more than asked for, whatever the server sends
                body.close()
                raise CheckpointCorrupt(
                    f"{self._where(path)}: {got} bytes in the answer for bytes {start}-{end - 1}, not {end - start}"
                )
            raw = getattr(body, "_raw_stream", None)
            fp = getattr(raw, "_fp", None)
            # Straight from the socket into the destination (http.client's readinto):
            # urllib3's readinto would read into a temporary and copy.
            readinto: Callable[[memoryview], int] | None = getattr(fp, "readinto", None)
            direct = readinto is not None and getattr(raw, "_decoder", None) is None
            if readinto is None or not direct:
                readinto = body.readinto
            done = False
            try:
                pos = start
                while pos < end:
                    n = readinto(view[pos : min(end, pos + READ_CHUNK)])
                    if not n:
                        raise StoreError(
                            f"{self._where(path)}: connection closed after {pos - start} of "
                            f"{end - start} bytes of range {start}-{end - 1}"
                        )
                    pos += n
                done = True
            finally:
                if done and direct and raw is not None and hasattr(raw, "release_conn"):
                    raw.release_conn()  # fully read: the connection goes back to the pool
                else:
                    body.close()

        self._call(f"GET {self._key(path)} bytes {start}-{end - 1}", once, nbytes=end - start)

    # ------------------------------------------------------------------ writes

    def commit_file(self, path: str, data: bytes) -> None:
        try:
            self._call(
                f"PUT {self._key(path)}",
                self._client.put_object,
                nbytes=len(data),
                Bucket=self.bucket,
                Key=self._key(path),
                Body=bytes(data),
            )
        except Exception as e:
            raise self._error(path, "commit (PUT)", e) from e

    def create_file(self, path: str, data: bytes) -> bool:
        """One PUT with ``If-None-Match: *``: S3 (since 2024), MinIO and moto refuse it when the key exists.

        The first call on this store checks that the server really refuses (:mod:`~spotsafe.storage.s3_fence`).
        """
        if self._conditional.honoured is None:
            self._conditional.probe(self._put_if_absent, self._delete_key)
        created = self._put_if_absent(path, data) if self._conditional.honoured else None
        return super().create_file(path, data) if created is None else created

    def _put_if_absent(self, path: str, data: bytes) -> bool | None:
        """The conditional PUT: True when written, False when the key exists, None when the server has none (501)."""
        from botocore.exceptions import ClientError

        try:
            self._call(
                f"PUT If-None-Match {self._key(path)}",
                self._client.put_object,
                nbytes=len(data),
                Bucket=self.bucket,
                Key=self._key(path),
                Body=bytes(data),
                IfNoneMatch="*",
            )
        except ClientError as e:
            code = error_code(e)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            if code in ("NotImplemented", "501"):
                self._conditional.unsupported()
                return None
            raise self._error(path, "create (conditional PUT)", e) from e
        except Exception as e:
            raise self._error(path, "create (conditional PUT)", e) from e
        return True

    def _delete_key(self, path: str) -> None:
        """Delete one object, best effort (the probe's): a failure is logged, not raised."""
        try:
            self._call(f"DELETE {self._key(path)}", self._client.delete_object, Bucket=self.bucket, Key=self._key(path))
        except Exception as e:  # noqa: BLE001 - best effort: a probe object left behind is only litter
            log.warning("%s: could not delete %s: %s", self.url, self._where(path), e)

    def write_file(self, path: str, buffers: Sequence[Buffer]) -> None:
        views, offsets, total = as_bytes_views(buffers)
        key = self._key(path)
        if total <= self.part_size:
            try:
                self._put(path, views, offsets, total)
            except Exception as e:
                raise self._error(path, "upload (PUT)", e) from e
            return
        part_size = self.part_size
        while -(-total // part_size) > MAX_PARTS:
            part_size *= 2
        try:
            upload_id = self._call(
                f"CreateMultipartUpload {key}",
                self._client.create_multipart_upload,
                Bucket=self.bucket,
                Key=key,
            )["UploadId"]
        except Exception as e:
            raise self._error(path, "starting the multipart upload", e) from e
        with self._lock:
            self._own_uploads.add(upload_id)
        try:
            bounds = [(s, min(s + part_size, total)) for s in range(0, total, part_size)]
            etags = self._run_parallel(
                [
                    partial(self._upload_part, key, upload_id, n, views, offsets, s, e)
                    for n, (s, e) in enumerate(bounds, start=1)
                ]
            )
            self._call(
                f"CompleteMultipartUpload {key}",
                self._client.complete_multipart_upload,
                nbytes=total,  # S3 assembles the parts before it answers: minutes for a large object
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]},
            )
        except BaseException as e:
            self._abort(key, upload_id)
            if isinstance(e, Exception):
                raise self._error(path, f"multipart upload ({len(bounds)} parts)", e) from e
            raise
        finally:
            with self._lock:
                self._own_uploads.discard(upload_id)

    def write_files(self, items: Sequence[tuple[str, Sequence[Buffer]]]) -> None:
        small: list[tuple[str, list[memoryview], list[int], int]] = []
        for path, buffers in items:
            views, offsets, total = as_bytes_views(buffers)
            if total > self.part_size:
                self.write_file(path, views)  # parallel parts of its own
            else:
                small.append((path, views, offsets, total))
        if not small:
            return
        try:
            self._run_parallel([partial(self._put, *args) for args in small])
        except Exception as e:
            path = small[0][0] if len(small) == 1 else small[0][0].rpartition("/")[0]
            raise self._error(path, f"upload of {len(small)} objects", e) from e

    def _put(self, path: str, views: Sequence[memoryview], offsets: Sequence[int], total: int) -> None:
        key = self._key(path)
        self._call(
            f"PUT {key}",
            lambda: self._data_client.put_object(
                Bucket=self.bucket, Key=key, Body=BuffersReader(views, offsets, 0, total)
            ),
            nbytes=total,
        )

    def _upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        views: Sequence[memoryview],
        offsets: Sequence[int],
        start: int,
        end: int,
    ) -> str:
        def once() -> str:
            response = self._data_client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=BuffersReader(views, offsets, start, end),
            )
            return str(response["ETag"])

        return self._call(f"UploadPart {number} of {key}", once, nbytes=end - start)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                f"AbortMultipartUpload {key}",
                self._client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
            )
        except Exception as e:  # noqa: BLE001 - cleanup_incomplete on the next start gets it
            log.warning("%s: could not abort multipart upload of %s: %s", self.url, key, e)

    # ------------------------------------------------------------------ maintenance

    def _uploads(self, prefix: str) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self._call(f"ListMultipartUploads {prefix or '/'}", self._client.list_multipart_uploads, **kwargs)
            uploads.extend(page.get("Uploads", ()))
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def cleanup_incomplete(self) -> None:
        """Abort multipart uploads under the prefix left by writers that died mid-save.

        Spared: this store's own uploads in flight, and uploads started after this
        store was created (another rank's save already under way).
        """
        self._abort_stale(self._dir_key(""))

    def _abort_stale(self, prefix: str) -> None:
        if self._warned_uploads:
            return  # this server cannot list them (see below): don't ask before every save
        try:
            uploads = self._uploads(prefix)
        except Exception as e:
            if error_code(e) in ("NotImplemented", "501", "AccessDenied", "403"):
                # Some S3-compatible servers lack the call, and a narrow IAM policy may leave
                # out s3:ListBucketMultipartUploads: neither is a reason to refuse saving.
                if not self._warned_uploads:
                    self._warned_uploads = True
                    log.warning(
                        "%s: cannot list multipart uploads (%s); stale ones left by killed "
                        "writers will not be aborted (a bucket lifecycle rule can)",
                        self.url,
                        error_code(e),
                    )
                return
            raise self._error("", "listing multipart uploads", e) from e
        with self._lock:
            own = set(self._own_uploads)
        for up in uploads:
            if up["UploadId"] in own:
                continue
            initiated = up.get("Initiated")
            if isinstance(initiated, datetime) and initiated > self._created:
                continue
            log.info("%s: aborting stale multipart upload of %s", self.url, up["Key"])
            self._abort(up["Key"], up["UploadId"])

    def delete_dir(self, path: str) -> None:
        prefix = self._dir_key(path)
        if not prefix:
            raise ValueError(f"{self.url}: refusing to delete the whole store")
        try:
            keys = [obj["Key"] for page in self._pages(prefix, delimited=False) for obj in page.get("Contents", ())]
            # The manifest goes first: a half-deleted checkpoint is never mistaken for a whole one.
            manifests = [k for k in keys if k.endswith("/manifest.json")]
            rest = [k for k in keys if not k.endswith("/manifest.json")]
            for batch in [manifests] + [rest[i : i + 1000] for i in range(0, len(rest), 1000)]:
                if batch:
                    response = self._call(
                        f"DeleteObjects under {prefix}",
                        self._client.delete_objects,
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                    )
                    errors = response.get("Errors") or []
                    if errors:
                        raise StoreError(f"{self._where(path)}: could not delete {errors[0]}")
        except StoreError:
            raise
        except Exception as e:
            raise self._error(path, "delete", e) from e

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        for name in ("_client", "_data_client"):
            client = getattr(self, name, None)
            if client is not None:
                client.close()


class _Silent(Exception):
    """The bucket check's read timed out (never retried)."""
