"""Blobs in an S3-compatible object store (``--blobs s3://BUCKET/PREFIX``).

Production points at a real S3-compatible service (AWS S3, MinIO, Ceph RGW, ...); the tests
use moto's standalone server, the only S3-compatible server installable here.

Settings from the environment (never from flags, never logged):

- ``PRIVFACE_S3_ENDPOINT``: the service's URL (unset: AWS S3); with an endpoint, requests use
  path-style addressing (``ENDPOINT/BUCKET/KEY``), which S3-compatible services expect;
- ``PRIVFACE_S3_REGION``: the region (default ``us-east-1``);
- credentials: boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
  [/``AWS_SESSION_TOKEN``], ``AWS_PROFILE`` and the shared files, instance roles);
- ``PRIVFACE_S3_CREATE_BUCKET=1``: create the bucket when it is missing (tests); otherwise
  a missing bucket is a clear error naming it.

Writes are atomic as S3 makes them: a single PutObject for a blob of up to one part, else a
multipart upload streamed from the chunk iterator one 8 MiB part at a time (never the whole
blob in memory), aborted on any exception so nothing is stored; an object appears only when
its upload completes. Every PutObject and UploadPart carries the SHA-256 of its bytes
(``x-amz-checksum-sha256``), so the service refuses a body altered in transit, and reads ask
for the stored checksum back (``ChecksumMode``), which botocore checks for single-part
objects. A reader that loses its connection mid-stream resumes with a ranged GET of the same
object version (``If-Match`` its ETag). A crash between parts can leave an incomplete
multipart upload (invisible to readers, but billed): :meth:`S3Blobs.sweep_incomplete_uploads`
aborts old ones; a bucket lifecycle rule (AbortIncompleteMultipartUpload) does the same.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from common.errors import NotFoundError, StorageUnavailableError
from server.blobs import READ_CHUNK_BYTES, BlobInfo, check_key

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_BYTES = 8 * MIB  # multipart part size; a blob of up to one part is a single PutObject
MIN_PART_BYTES = 5 * MIB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum parts per upload
MAX_RESUMES = 3  # ranged re-GETs after a read that broke mid-stream
DEFAULT_REGION = "us-east-1"
# S3 bucket names: 3-63 lower-case letters, digits, '.' and '-', starting and ending alnum.
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Read errors after the response started: worth resuming from the offset reached.
STREAM_ERRORS = (ReadTimeoutError, ResponseStreamingError, IncompleteReadError,
                 ConnectionClosedError)


class S3ConfigError(ValueError):
    """The blob store cannot be used as configured (missing bucket, no access, bad URL)."""


def client_config(region: str, *, path_style: bool) -> Config:
    """Timeouts and retries for every S3 call: connect 5 s, read 60 s, standard retry mode
    (exponential backoff with jitter on throttling, 5xx and connection errors), 5 attempts."""
    return Config(
        region_name=region,
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=32,
        s3={"addressing_style": "path" if path_style else "auto"},
    )


def _sha256_b64(data: bytes | bytearray) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_missing(exc: ClientError) -> bool:
    """A missing key (not a missing bucket, which is a configuration error)."""
    if _error_code(exc) == "NoSuchBucket":
        return False
    return _error_code(exc) in ("NoSuchKey", "404", "NotFound") or _status(exc) == 404


class S3Blobs:
    """A :class:`server.blobs.BlobStore` on one bucket, every key under ``prefix``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *,
                 part_bytes: int = PART_BYTES) -> None:
        if not BUCKET_RE.fullmatch(bucket):
            raise S3ConfigError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValueError:
                raise S3ConfigError(f"invalid S3 key prefix {prefix!r}") from None
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"multipart parts must be at least {MIN_PART_BYTES} bytes")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.part_bytes = part_bytes
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, environ: dict[str, str] | None = None) -> S3Blobs:
        """The store ``s3://BUCKET[/PREFIX]`` names, with endpoint, region and bucket creation
        from the environment (see the module's docstring); checks that the bucket is there
        (creating it when ``PRIVFACE_S3_CREATE_BUCKET=1``)."""
        env = os.environ if environ is None else environ
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise S3ConfigError(f"invalid blob store URL {url!r}: use s3://BUCKET/PREFIX")
        endpoint = env.get("PRIVFACE_S3_ENDPOINT") or None
        region = env.get("PRIVFACE_S3_REGION") or DEFAULT_REGION
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint,
            config=client_config(region, path_style=endpoint is not None))
        store = cls(client, parts.netloc, parts.path)
        store.ensure_bucket(create=env.get("PRIVFACE_S3_CREATE_BUCKET") == "1")
        return store

    def ensure_bucket(self, *, create: bool = False) -> None:
        """Checks that the bucket exists and is reachable with these credentials; creates
        it when missing if ``create``; otherwise S3ConfigError naming the bucket."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise S3ConfigError(
                    f"access to S3 bucket {self.bucket!r} denied: check the credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile)") from None
            if status != 404:
                raise S3ConfigError(
                    f"S3 bucket {self.bucket!r}: {_error_code(exc) or status}") from None
        except BotoCoreError as exc:
            raise S3ConfigError(f"cannot reach the S3 service for bucket {self.bucket!r}: "
                                f"{type(exc).__name__}") from None
        if not create:
            raise S3ConfigError(
                f"S3 bucket {self.bucket!r} does not exist: create it (with a lifecycle rule "
                "aborting incomplete multipart uploads) or set PRIVFACE_S3_CREATE_BUCKET=1")
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != DEFAULT_REGION:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise S3ConfigError(f"cannot create S3 bucket {self.bucket!r}: "
                                    f"{_error_code(exc) or _status(exc)}") from None
        log.info("created S3 bucket %s", self.bucket)

    # -- keys -----------------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The S3 object key of a blob key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list_prefix(self, prefix: str) -> str:
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def _blob_key(self, object_key: str) -> str:
        return object_key[len(self.prefix) + 1:] if self.prefix else object_key

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def _service(self, action: str, key: str) -> Iterator[None]:
        """The service failing (unreachable, 5xx after botocore's retries) becomes
        StorageUnavailableError: the call gets UNAVAILABLE and the phone retries."""
        try:
            yield
        except FlexibleChecksumError:
            raise  # a stored object that fails its checksum: retrying will not mend it
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailableError(
                f"the blob store {self.url} could not {action} {key} ({type(exc).__name__}): "
                "retry shortly") from exc

    def put(self, key: str, chunks: Iterable[bytes] | bytes) -> int:
        with self._service("store", key):
            return self._put(key, chunks)

    def _put(self, key: str, chunks: Iterable[bytes] | bytes) -> int:
        object_key = self.object_key(key)
        if isinstance(chunks, bytes | bytearray | memoryview):
            chunks = [bytes(chunks)]
        part = self.part_bytes
        buf = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                size += len(view)
                while view:
                    if len(buf) == part:  # a full part, and more follows: send it
                        if upload_id is None:
                            upload_id = self._create_upload(object_key)
                        parts.append(self._upload_part(object_key, upload_id, len(parts) + 1,
                                                       buf))
                        buf = bytearray()
                    take = part - len(buf)
                    buf += view[:take]
                    view = view[take:]
            if upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=object_key, Body=bytes(buf),
                                       ChecksumAlgorithm="SHA256",
                                       ChecksumSHA256=_sha256_b64(buf))
            else:
                parts.append(self._upload_part(object_key, upload_id, len(parts) + 1, buf))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts})
        except BaseException:
            if upload_id is not None:
                self._abort_upload(object_key, upload_id)
            raise
        return size

    def _create_upload(self, object_key: str) -> str:
        response = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=object_key, ChecksumAlgorithm="SHA256")
        return str(response["UploadId"])

    def _upload_part(self, object_key: str, upload_id: str, number: int,
                     data: bytearray) -> dict[str, Any]:
        if number > MAX_PARTS:
            raise ValueError(f"blob {object_key} exceeds {MAX_PARTS} parts of "
                             f"{self.part_bytes} bytes")
        checksum = _sha256_b64(data)
        response = self.client.upload_part(
            Bucket=self.bucket, Key=object_key, UploadId=upload_id, PartNumber=number,
            Body=bytes(data), ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def _abort_upload(self, object_key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=object_key,
                                               UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:  # the original error matters more
            log.warning("could not abort the multipart upload of %s in %s (%s): "
                        "sweep_incomplete_uploads or a lifecycle rule will",
                        object_key, self.url, type(exc).__name__)

    def sweep_incomplete_uploads(self, older_than: float) -> int:
        """Aborts multipart uploads under the prefix started before ``older_than`` (epoch
        seconds): what a crash between two parts leaves. Returns how many."""
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._list_prefix("")):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() <= older_than:
                    self._abort_upload(upload["Key"], upload["UploadId"])
                    aborted += 1
        return aborted

    # -- reading --------------------------------------------------------------------------

    def _get(self, object_key: str, key: str, **extra: str) -> dict[str, Any]:
        try:
            response: dict[str, Any] = self.client.get_object(
                Bucket=self.bucket, Key=object_key, **extra)
        except ClientError as exc:
            if _is_missing(exc):
                raise NotFoundError(f"blob {key} is missing from {self.url}") from None
            raise
        return response

    def read(self, key: str) -> bytes:
        return b"".join(self.open(key, 8 * MIB))

    def open(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        object_key = self.object_key(key)
        with self._service("read", key):
            response = self._get(object_key, key, ChecksumMode="ENABLED")
        return self._stream(object_key, key, response, chunk_bytes)

    def _stream(self, object_key: str, key: str, response: dict[str, Any],
                chunk_bytes: int) -> Iterator[bytes]:
        with self._service("read", key):
            yield from self._chunks(object_key, key, response["Body"], str(response["ETag"]),
                                    int(response["ContentLength"]), chunk_bytes)

    def _chunks(self, object_key: str, key: str, body: Any, etag: str, size: int,
                chunk_bytes: int) -> Iterator[bytes]:
        offset = 0
        resumes = 0
        try:
            while True:  # until the empty read at the end, where botocore checks the checksum
                try:
                    chunk = body.read(chunk_bytes)
                except STREAM_ERRORS as exc:
                    body.close()
                    resumes += 1
                    if resumes > MAX_RESUMES or offset >= size:
                        raise
                    log.info("reading blob %s from %s broke at byte %d (%s): resuming",
                             key, self.url, offset, type(exc).__name__)
                    body = self._get(object_key, key, Range=f"bytes={offset}-",
                                     IfMatch=etag)["Body"]
                    continue
                if not chunk:
                    break
                offset += len(chunk)
                yield chunk
        finally:
            body.close()
        if offset != size:
            raise OSError(f"blob {key} in {self.url}: read {offset} of {size} bytes")

    # -- the rest -------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self._service("delete", key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
            except ClientError as exc:
                if not _is_missing(exc):
                    raise

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._service("list", prefix or "/"):
            for page in paginator.paginate(Bucket=self.bucket,
                                           Prefix=self._list_prefix(prefix)):
                for item in page.get("Contents", []):
                    yield BlobInfo(self._blob_key(item["Key"]), int(item["Size"]),
                                   item["LastModified"].timestamp())
