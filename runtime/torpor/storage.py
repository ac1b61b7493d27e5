"""The storage seam: a local directory or an S3 prefix behind one small interface.

Checkpoints go to whatever ``directory`` names: a path, ``file://path`` or
``s3://bucket/prefix``. Everything above this module speaks in *keys* (``rank_0/CKP-1_5.ckpt``)
relative to that root, so the layout rules in :mod:`torpor.checkpoints` are written once and
hold for both backends. Torch-free and Kubernetes-free: the operator prunes the same bucket
through the same class.

Guarantees every backend gives, because the manifest protocol relies on them:

* ``put_bytes`` is atomic per key: a reader sees the old object, the new one or nothing,
  never a torn file (local: write a hidden temp file, fsync, rename; S3: a PUT or a completed
  multipart upload is atomic).
* ``put_bytes`` returns only once the bytes are durable, so a manifest written afterwards
  never points at a shard that could still vanish.
* ``get_bytes`` raises ``FileNotFoundError`` for a missing key; other failures after the
  retries raise :class:`torpor.errors.StorageError`.

Example:
    >>> store = open_storage("s3://bucket/jobs/demo")  # doctest: +SKIP
    >>> store.put_bytes("rank_0/x.ckpt", b"...")        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torpor.errors import IntegrityError, StorageError

S3_DELETE_BATCH = 1000
"""Objects per ``DeleteObjects`` call: the S3 API's own maximum, so pruning is one call per 1000."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object, as a listing reports it."""

    key: str
    """Key relative to the storage root, ``/``-separated."""
    size: int
    """Size in bytes."""
    modified: float
    """Last modification, seconds since the epoch, by the store's clock (one clock for all ranks)."""


@runtime_checkable
class Storage(Protocol):
    """What the runtime and the operator need from a checkpoint store: nothing more."""

    @property
    def uri(self) -> str:
        """The root this store was opened on, e.g. ``s3://bucket/prefix`` or ``/data/ckpt``."""
        ...

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``key`` atomically and durably (see the module docstring)."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; ``FileNotFoundError`` if the key is absent."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (temporary files excluded)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete the keys, batched; missing keys are not an error (deletes are idempotent)."""
        ...


def sha256_hex(data: bytes | memoryview) -> str:
    """The hex sha256 digest manifests record for every file."""
    return hashlib.sha256(data).hexdigest()


def read_verified(storage: Storage, key: str, *, size: int, sha256: str) -> bytes:
    """Read ``key`` and check it against its manifest entry before anyone unpickles it.

    Raises:
        IntegrityError: size or sha256 differ; the message names the key and both values.
        FileNotFoundError: the key is absent.
    """
    data = storage.get_bytes(key)
    if len(data) != size:
        raise IntegrityError(
            f"{storage.uri}/{key}: size {len(data)} does not match the manifest's size {size}; "
            "the shard is truncated or was replaced, refusing to load it"
        )
    digest = sha256_hex(data)
    if digest != sha256:
        raise IntegrityError(
            f"{storage.uri}/{key}: sha256 {digest} does not match the manifest's sha256 {sha256}; "
            "the shard is corrupted or was modified, refusing to load it"
        )
    return data


class LocalStorage:
    """A directory on a local or shared filesystem.

    Multi-rank jobs need a directory every rank sees (NFS, a shared volume): completeness is
    judged from one listing of all ranks' manifests.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Open ``root`` (created on the first write, not here, so opening has no side effect)."""
        self._root = Path(root)

    @property
    def uri(self) -> str:
        return str(self._root)

    @property
    def root(self) -> Path:
        """The directory itself."""
        return self._root

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"key must be a relative path without '..', got {key!r}")
        return self._root / key

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden temp name in the same directory: same filesystem, so the rename is atomic,
        # and listings skip dot-files, so a half-written file is never mistaken for a shard.
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self._root.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(self._root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self._root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:  # deleted between walk and stat by a concurrent prune
                    continue
                found.append(ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime))
        return found

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: POSIX needs the directory entry itself flushed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class S3Settings:
    """How :class:`S3Storage` talks to S3; defaults suit checkpoints of MiB to GiB."""

    multipart_threshold: int = 16 * 1024 * 1024
    """Bytes above which uploads go multipart. 16 MiB: small shards stay one PUT (one round trip)."""
    multipart_chunksize: int = 16 * 1024 * 1024
    """Part size in bytes. 16 MiB keeps a 1 GiB shard at 64 parts, well under the 10,000 limit."""
    max_concurrency: int = 8
    """Parts in flight per transfer; enough to fill a NIC without starving the training process."""
    max_attempts: int = 8
    """Attempts per request in botocore's ``standard`` retry mode (exponential backoff, jitter)."""
    connect_timeout: float = 10.0
    """Seconds to connect; short, since a retry is cheaper than a hung save in a grace period."""
    read_timeout: float = 60.0
    """Seconds to wait for a response before the request is retried."""

    def __post_init__(self) -> None:
        for field in ("multipart_threshold", "multipart_chunksize", "max_concurrency", "max_attempts"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"S3Settings.{field} must be a positive int, got {value!r}")
        if self.multipart_chunksize < 5 * 1024 * 1024:
            raise ValueError(
                f"S3Settings.multipart_chunksize must be at least 5 MiB (the S3 minimum part size), "
                f"got {self.multipart_chunksize!r}"
            )


class S3Storage:
    """An S3 (or S3-compatible: MinIO, Ceph, R2) prefix through boto3.

    The endpoint, credentials and region come from boto3's usual sources; ``AWS_ENDPOINT_URL``
    selects a non-AWS endpoint (path-style addressing is then used, which every
    S3-compatible server supports).
    """

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None) -> None:
        """Open ``s3://bucket/prefix``. No request is made until the first operation."""
        if not bucket:
            raise ValueError(f"bucket must be a non-empty string, got {bucket!r}")
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._settings = settings or S3Settings()
        self._client_obj: Any = None
        self._transfer: Any = None

    @property
    def uri(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def bucket(self) -> str:
        """The bucket name."""
        return self._bucket

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ValueError(f"key must be a non-empty relative key, got {key!r}")
        return f"{self._prefix}/{key}" if self._prefix else key

    def _client(self) -> Any:
        if self._client_obj is None:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config

            s = self._settings
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
            config = Config(
                retries={"max_attempts": s.max_attempts, "mode": "standard"},
                max_pool_connections=max(10, 2 * s.max_concurrency),
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                s3={"addressing_style": "path"} if endpoint else {},
            )
            self._client_obj = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            self._transfer = TransferConfig(
                multipart_threshold=s.multipart_threshold,
                multipart_chunksize=s.multipart_chunksize,
                max_concurrency=s.max_concurrency,
                use_threads=True,
            )
        return self._client_obj

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        return StorageError(f"{action} {self.uri}/{key} failed after retries: {exc}")

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        try:
            client.upload_fileobj(io.BytesIO(data), self._bucket, self._key(key), Config=self._transfer)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", key, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        buf = io.BytesIO()
        try:
            client.download_fileobj(self._bucket, self._key(key), buf, Config=self._transfer)
        except ClientError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.uri}/{key}") from exc
            raise self._fail("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc
        return buf.getvalue()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        root = f"{self._prefix}/" if self._prefix else ""
        found = []
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=root + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            key=obj["Key"][len(root):],
                            size=int(obj["Size"]),
                            modified=obj["LastModified"].timestamp(),
                        )
                    )
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc
        return found

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client().head_object(Bucket=self._bucket, Key=self._key(key))
        except ClientError as exc:
            if _is_not_found(exc):
                return False
            raise self._fail("head", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head", key, exc) from exc
        return True

    def delete_many(self, keys: Iterable[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = [self._key(k) for k in keys]
        for start in range(0, len(full), S3_DELETE_BATCH):
            batch = full[start:start + S3_DELETE_BATCH]
            try:
                reply = self._client().delete_objects(
                    Bucket=self._bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except (BotoCoreError, ClientError) as exc:
                raise self._fail("delete", batch[0], exc) from exc
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"delete in {self.uri} failed for {len(errors)} keys, first {first.get('Key')!r}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )

    def abort_stale_uploads(self, older_than: float, keys: Iterable[str] | None = None) -> int:
        """Abort multipart uploads started before ``older_than`` (epoch seconds).

        A save killed mid-upload leaves parts that cost storage but never become an object;
        the operator's retention calls this. AWS lists uploads under the whole prefix; MinIO
        lists them only for an exact key, so pass ``keys`` (e.g. the missing shards of an
        incomplete checkpoint) to reach those too. A bucket lifecycle rule
        (``AbortIncompleteMultipartUpload``) is the belt to these braces.

        Returns:
            How many uploads were aborted.
        """
        client = self._client()
        root = f"{self._prefix}/" if self._prefix else ""
        prefixes = [self._key(k) for k in keys] if keys is not None else [root]
        aborted = 0
        for prefix in prefixes:
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=self._bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < older_than:
                        client.abort_multipart_upload(
                            Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        return aborted

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"


def _is_not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def open_storage(uri: str | os.PathLike[str], *, s3: S3Settings | None = None) -> Storage:
    """Open a store from ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    Raises:
        ValueError: an ``s3://`` URI without a bucket, or an unsupported scheme.
    """
    if isinstance(uri, os.PathLike):
        return LocalStorage(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"storage uri must be a non-empty str or path, got {uri!r}")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"storage uri {uri!r} names no bucket; expected s3://bucket/prefix")
        return S3Storage(bucket, prefix, s3)
    if uri.startswith("file://"):
        return LocalStorage(uri[len("file://"):])
    if "://" in uri:
        raise ValueError(f"storage uri {uri!r} has an unsupported scheme; use a path, file:// or s3://")
    return LocalStorage(uri)
