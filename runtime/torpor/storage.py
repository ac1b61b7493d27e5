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

import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torpor import stale_temps
from torpor.errors import IntegrityError, StorageError
from torpor.transfer import PART_CHECKSUM_ALGORITHM, PartBody, RangeReader, direct_reads_possible, presigned_get

S3_DELETE_BATCH = 1000
_READ_SLICE = 8 * 1024 * 1024
"""Bytes per read of a verified local read: large enough for few system calls, small enough
to be hashed while still in the CPU cache."""
"""Objects per ``DeleteObjects`` call: the S3 API's own maximum, so pruning is one call per 1000."""


@dataclass(frozen=True)
class Upload:
    """One multipart upload in progress, as the store lists it."""

    key: str
    """Relative to the store's prefix."""
    upload_id: str
    initiated: float
    """When it was started, epoch seconds by the store's clock."""


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
    return bytes(_check(storage, key, storage.get_bytes(key), size, sha256))


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
        # Those a killed save left behind go now (see torpor.stale_temps).
        stale_temps.remove_stale(path.parent)
        tmp = stale_temps.temp_path(path)
        stale_temps.opened(tmp)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            stale_temps.closed(tmp)
        _fsync_dir(path.parent)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def get_verified(self, key: str, *, size: int, sha256: str, into: Any = None) -> Any:
        """Read ``key`` into ``into`` (or a new bytearray), checking size and sha256 on the way.

        One pass in slices: each slice is hashed while it is still in the CPU cache, and
        nothing but the destination is ever allocated, so loading a shard costs its size
        once (``read_bytes`` plus a decode held it twice).

        Raises:
            IntegrityError: size or sha256 differ from the manifest's (also when the file
                changes size while it is read).
            FileNotFoundError: the key is absent.
        """
        with open(self._path(key), "rb", buffering=0) as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                raise _size_error(self, key, actual, size)
            out = bytearray(size) if into is None else into
            digest = hashlib.sha256()
            pos = 0
            with memoryview(out).cast("B") as view:
                if len(view) != size:
                    raise ValueError(f"into must hold exactly size={size} bytes, got {len(view)}")
                while pos < size:
                    with view[pos:min(pos + _READ_SLICE, size)] as piece:
                        n = f.readinto(piece)
                        if not n:
                            break
                        digest.update(piece[:n])
                    pos += n
            if pos != size or f.read(1):
                raise _size_error(self, key, pos if pos != size else size + 1, size)
        if digest.hexdigest() != sha256:
            raise _sha_error(self, key, digest.hexdigest(), sha256)
        return out

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

    def writer(self, key: str) -> ObjectWriter:
        """Streams into a temp file, then fsync and rename: atomic and durable on ``close``."""
        return _LocalWriter(self, key)

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

    multipart_threshold: int = 32 * 1024 * 1024
    """Bytes above which uploads go multipart: shards up to one part stay one PUT (one round trip)."""
    multipart_chunksize: int = 32 * 1024 * 1024
    """Part size in bytes (also the ranged-GET size of parallel reads). Measured with
    ``bench/bench_save.py --sweep`` (see bench/README.md): 32 MiB parts beat 8, 16 and 64 MiB;
    a 1 GiB shard is 32 parts, far under the 10,000-part limit."""
    max_concurrency: int = 4
    """Parts in flight per transfer. Measured: 4 beat 2 and 8 (more threads only contend for
    the CPU that hashing and the server need); the streaming writer's memory is
    ``(max_concurrency + 1) * multipart_chunksize``."""
    max_attempts: int = 8
    """Attempts per request in botocore's ``standard`` retry mode (exponential backoff, jitter).
    ``AWS_MAX_ATTEMPTS`` (boto3's own variable) overrides it, see :meth:`from_environ`."""
    connect_timeout: float = 10.0
    """Seconds to connect; short, since a retry is cheaper than a hung save in a grace period."""
    read_timeout: float = 60.0
    """Seconds to wait for a response before the request is retried."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Defaults, with ``AWS_MAX_ATTEMPTS`` honoured as boto3 users expect.

        Raises:
            ValueError: ``AWS_MAX_ATTEMPTS`` is not a positive integer (named with its value).
        """
        env = os.environ if environ is None else environ
        raw = env.get("AWS_MAX_ATTEMPTS", "").strip()
        if not raw:
            return cls()
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"AWS_MAX_ATTEMPTS must be a positive integer, got {raw!r}")
        return cls(max_attempts=int(raw))

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

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None, *,
                 client: Any = None) -> None:
        """Open ``s3://bucket/prefix``. No request is made until the first operation.

        Args:
            client: a boto3 S3 client (from :func:`s3_client`) to share with other stores; the
                operator opens one prefix per job and would otherwise build a client per job.
                Default: this store makes its own on first use.
        """
        if not bucket:
            raise ValueError(f"bucket must be a non-empty string, got {bucket!r}")
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._settings = settings or S3Settings.from_environ()
        self._client_obj: Any = None
        self._transfer: Any = None
        self._pool: Any = None
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()
        self._client_lock = threading.Lock()
        self._raw_obj: Any = None
        self._shared = client

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

    def warm(self) -> None:
        """Create the boto3 clients now (a second or more of imports and model loading on a
        busy machine), so the first save after a SIGTERM does not pay for it."""
        self._client()
        self._raw_client()

    def _client(self) -> Any:
        if self._client_obj is not None:
            return self._client_obj
        with self._client_lock:
            return self._make_client()

    def _new_client(self, parameter_validation: bool = True, sign_payload: bool = True) -> Any:
        return s3_client(self._settings, parameter_validation=parameter_validation, sign_payload=sign_payload)

    def _make_client(self) -> Any:
        if self._client_obj is None:
            from boto3.s3.transfer import TransferConfig

            s = self._settings
            self._transfer = TransferConfig(
                multipart_threshold=s.multipart_threshold,
                multipart_chunksize=s.multipart_chunksize,
                max_concurrency=s.max_concurrency,
                use_threads=True,
            )
            # Published last: a reader that sees the client also sees the transfer config.
            self._client_obj = self._shared if self._shared is not None else self._new_client()
        return self._client_obj

    def _raw_client(self) -> Any:
        """A client for upload parts whose body may be a memoryview (zero-copy parts).

        botocore's parameter validation accepts only bytes, bytearray or file objects as a
        body, although its signer and urllib3 take any buffer; this client skips the
        validation, and is used for nothing but ``upload_part`` calls built here. It also
        leaves the payload unsigned: each part carries its CRC32 instead (see
        :mod:`torpor.transfer`).
        """
        if self._raw_obj is None:
            with self._client_lock:
                if self._raw_obj is None:
                    self._raw_obj = self._new_client(parameter_validation=False, sign_payload=False)
        return self._raw_obj

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

    # -- streaming -------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._settings.max_concurrency, thread_name_prefix="torpor-s3")
            return self._pool

    def _take_buffer(self) -> bytearray:
        with self._lock:
            return self._buffers.pop() if self._buffers else bytearray(self._settings.multipart_chunksize)

    def _give_buffer(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._buffers) <= self._settings.max_concurrency:
                self._buffers.append(buf)

    def writer(self, key: str) -> ObjectWriter:
        """A streaming writer: bytes go out as multipart parts while the caller still writes.

        Parts are staged in buffers kept between saves (no allocation, no page faults after
        the first save); at most ``max_concurrency`` parts are in flight, so memory stays at
        ``(max_concurrency + 1) * multipart_chunksize`` whatever the object's size. The object
        appears only when :meth:`ObjectWriter.close` completes the upload (atomic, durable).
        """
        return _S3Writer(self, key)

    def get_verified(self, key: str, *, size: int, sha256: str, into: Any = None) -> Any:
        """Read ``key`` with parallel ranged GETs and check size and sha256 as parts arrive.

        Args:
            into: a writable buffer of exactly ``size`` bytes to read into (e.g. a memory
                map of a file ``torch.load(mmap=True)`` then uses in place); default: a new
                bytearray.

        Returns:
            The buffer holding the verified bytes.

        Raises:
            IntegrityError: size or sha256 differ from the manifest's.
            FileNotFoundError: the key is absent.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        part = self._settings.multipart_chunksize
        if size <= part and into is None:
            return _check(self, key, self.get_bytes(key), size, sha256)
        client = self._client()
        out = bytearray(size) if into is None else into
        view = memoryview(out).cast("B")
        if len(view) != size:
            raise ValueError(f"into must hold exactly size={size} bytes, got {len(view)}")

        url = presigned_get(client, self._bucket, self._key(key))
        direct = None
        if direct_reads_possible(url):
            direct = RangeReader(url, name=f"{self.uri}/{key}", max_attempts=self._settings.max_attempts,
                                 timeout=self._settings.read_timeout, ca_bundle=os.environ.get("AWS_CA_BUNDLE") or None)

        def fetch(start: int) -> tuple[int, int]:
            end = min(start + part, size)
            if direct is not None:  # socket -> buffer, no copies (see torpor.transfer)
                reply = direct.read_into(view[start:end], start)
                return reply.received, reply.total
            got = client.get_object(Bucket=self._bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
            total = int(str(got.get("ContentRange", "")).rpartition("/")[2] or -1)
            body = got["Body"]
            pos = start
            try:
                while pos < end:
                    n = body.readinto(view[pos:end])
                    if not n:
                        break
                    pos += n
            finally:
                body.close()
            return pos - start, total

        digest = hashlib.sha256()
        got, total = 0, -1
        futures: list[tuple[int, Future[tuple[int, int]]]] = []
        try:
            futures = [(start, self._executor().submit(fetch, start)) for start in range(0, size, part)]
            for start, future in futures:  # hash in order while later parts still download
                n, total = future.result()
                got += n
                digest.update(view[start:start + n])
                if n != min(part, size - start):
                    break
        except ClientError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.uri}/{key}") from exc
            if _code(exc) == "InvalidRange":
                raise IntegrityError(f"{self.uri}/{key}: shorter than the manifest's size {size}; "
                                     "refusing to load it") from exc
            raise self._fail("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc
        finally:
            for _, future in futures:
                future.cancel()
            wait_futures([f for _, f in futures])  # no part may still write into the buffer
            if direct is not None:
                direct.close()
            with contextlib.suppress(BufferError):  # a part still writing after a failure
                view.release()
        if got != size or total not in (size, -1):
            raise IntegrityError(f"{self.uri}/{key}: size {total if total >= 0 else got} does not match the "
                                 f"manifest's size {size}; the shard is truncated or was replaced, refusing to "
                                 "load it")
        if total == -1 and self.exists_size(key) != size:  # a server without Content-Range
            raise IntegrityError(f"{self.uri}/{key}: the object is larger than the manifest's size {size}; "
                                 "refusing to load it")
        if digest.hexdigest() != sha256:
            raise IntegrityError(
                f"{self.uri}/{key}: sha256 {digest.hexdigest()} does not match the manifest's sha256 {sha256}; "
                "the shard is corrupted or was modified, refusing to load it")
        return out  # the buffer itself: no copy of a GiB just to freeze it

    def exists_size(self, key: str) -> int | None:
        """The object's size, or ``None`` when absent."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self._client().head_object(Bucket=self._bucket, Key=self._key(key))
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise self._fail("head", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head", key, exc) from exc
        return int(reply["ContentLength"])

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
        return self.exists_size(key) is not None

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

    def multipart_uploads(self, keys: Iterable[str] | None = None) -> list[Upload]:
        """The multipart uploads in progress: of ``keys`` (relative), or under the whole prefix.

        AWS lists uploads under a prefix; MinIO lists them only for an exact key, so pass
        ``keys`` (e.g. the missing shards of an incomplete checkpoint) to reach those too.
        """
        client = self._client()
        root = f"{self._prefix}/" if self._prefix else ""
        prefixes = [self._key(k) for k in keys] if keys is not None else [root]
        found: list[Upload] = []
        for prefix in prefixes:
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=self._bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    key = upload["Key"][len(root):] if upload["Key"].startswith(root) else upload["Key"]
                    found.append(Upload(key, upload["UploadId"], upload["Initiated"].timestamp()))
        return found

    def abort_upload(self, upload: Upload) -> None:
        """Abort one multipart upload (its parts are freed; an upload already gone is no error)."""
        try:
            self._client().abort_multipart_upload(Bucket=self._bucket, Key=self._key(upload.key),
                                                  UploadId=upload.upload_id)
        except Exception as exc:
            if _code(exc) != "NoSuchUpload":
                raise

    def abort_stale_uploads(self, older_than: float, keys: Iterable[str] | None = None) -> int:
        """Abort multipart uploads started before ``older_than`` (epoch seconds).

        A save killed mid-upload leaves parts that cost storage but never become an object;
        the operator's retention calls this. ``keys`` as in :meth:`multipart_uploads`. A bucket
        lifecycle rule (``AbortIncompleteMultipartUpload``) is the belt to these braces.

        Returns:
            How many uploads were aborted.
        """
        stale = [u for u in self.multipart_uploads(keys) if u.initiated < older_than]
        for upload in stale:
            self.abort_upload(upload)
        return len(stale)

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _is_not_found(exc: Exception) -> bool:
    return _code(exc) in {"404", "NoSuchKey", "NotFound"}


def _check(storage: Storage, key: str, data: bytes | bytearray, size: int, sha256: str) -> bytes | bytearray:
    if len(data) != size:
        raise _size_error(storage, key, len(data), size)
    digest = sha256_hex(data)
    if digest != sha256:
        raise _sha_error(storage, key, digest, sha256)
    return data


def _size_error(storage: Storage, key: str, actual: int, size: int) -> IntegrityError:
    return IntegrityError(f"{storage.uri}/{key}: size {actual} does not match the manifest's size {size}; "
                          "the shard is truncated or was replaced, refusing to load it")


def _sha_error(storage: Storage, key: str, digest: str, sha256: str) -> IntegrityError:
    return IntegrityError(f"{storage.uri}/{key}: sha256 {digest} does not match the manifest's sha256 {sha256}; "
                          "the shard is corrupted or was modified, refusing to load it")


class ObjectWriter:
    """Streams one object into a store; ``close`` makes it appear atomically and durably.

    Counts the bytes and their sha256 on the way, so the manifest entry costs no second pass.
    The base class buffers everything and calls ``put_bytes`` (any :class:`Storage`);
    backends override it to stream.
    """

    def __init__(self, storage: Storage, key: str) -> None:
        """Start writing ``key`` of ``storage``."""
        self.storage = storage
        self.key = key
        self.size = 0
        self._digest = hashlib.sha256()
        self._parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview, *, borrow: bool = False) -> int:
        """Append ``data``.

        Args:
            data: the bytes.
            borrow: the caller guarantees ``data`` stays alive and unchanged until
                :meth:`close` returns, so a backend may send it without copying it first.
                Without it, ``data`` is consumed before ``write`` returns.
        """
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self.size += len(view)
        self._put(view, borrow)
        return len(view)

    def flush(self) -> None:
        """Nothing to do: ``close`` is what makes bytes durable (``torch.save`` calls it)."""

    def _put(self, view: memoryview, borrow: bool) -> None:
        self._parts.append(bytes(view))

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._digest.hexdigest()

    def close(self) -> None:
        """Store the object; returns once it is durable."""
        self.closed = True
        self.storage.put_bytes(self.key, b"".join(self._parts))
        self._parts = []

    def abort(self) -> None:
        """Give up: nothing is stored (best effort; never raises)."""
        self.closed = True
        self._parts = []


def open_writer(storage: Storage, key: str) -> ObjectWriter:
    """The streaming writer of ``storage`` when it has one, else a buffering one."""
    make = getattr(storage, "writer", None)
    return make(key) if callable(make) else ObjectWriter(storage, key)


def read_verified_fast(storage: Storage, key: str, *, size: int, sha256: str) -> bytes | bytearray:
    """:func:`read_verified`, through parallel ranged reads where the store has them."""
    fetch = getattr(storage, "get_verified", None)
    if callable(fetch):
        return fetch(key, size=size, sha256=sha256)  # type: ignore[no-any-return]
    return read_verified(storage, key, size=size, sha256=sha256)


class _LocalWriter(ObjectWriter):
    """Writes to a hidden temp file beside the target, fsyncs, renames (see ``put_bytes``)."""

    def __init__(self, storage: LocalStorage, key: str) -> None:
        super().__init__(storage, key)
        self._path = storage._path(key)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        stale_temps.remove_stale(self._path.parent)
        self._tmp = stale_temps.temp_path(self._path)
        stale_temps.opened(self._tmp)
        try:
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        except BaseException:
            stale_temps.closed(self._tmp)
            raise

    def _put(self, view: memoryview, borrow: bool) -> None:
        self._file.write(view)

    def close(self) -> None:
        self.closed = True
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._path)
        except BaseException:
            self.abort()
            raise
        stale_temps.closed(self._tmp)
        _fsync_dir(self._path.parent)

    def abort(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._file.close()
        self._tmp.unlink(missing_ok=True)
        stale_temps.closed(self._tmp)


class _S3Writer(ObjectWriter):
    """Multipart upload fed as bytes arrive; one PUT when the object fits in one part.

    Every part is exactly ``multipart_chunksize`` bytes (the last one shorter), assembled as
    a list of pieces: lent memory (a tensor's storage) goes in as a view, anything else is
    copied into the part's staging buffer. A part of torch's record header plus 32 MiB of a
    tensor thus costs a few hundred bytes of copying, not 32 MiB.
    """

    def __init__(self, storage: S3Storage, key: str) -> None:
        super().__init__(storage, key)
        self._s3 = storage
        self._client = storage._client()
        self._full_key = storage._key(key)
        self._part_size = storage._settings.multipart_chunksize
        self._slots = threading.BoundedSemaphore(storage._settings.max_concurrency)
        self._pieces: list[memoryview] = []
        self._filled = 0  # bytes of the current part so far
        self._staging: bytearray | None = None  # the current part's buffer for copied bytes
        self._staged = 0  # bytes used in it
        self._upload_id: str | None = None
        self._futures: list[Future[dict[str, Any]]] = []

    def _put(self, view: memoryview, borrow: bool) -> None:
        while len(view):
            take = min(self._part_size - self._filled, len(view))
            if borrow:
                self._pieces.append(view[:take])
            else:
                self._stage(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._part_size and len(view):
                self._send_part()  # a full part with more to come (the last one waits for close)

    def _stage(self, data: memoryview) -> None:
        if self._staging is None:
            self._staging = self._s3._take_buffer()
            self._staged = 0
        start, end = self._staged, self._staged + len(data)
        self._staging[start:end] = data
        self._staged = end
        last = self._pieces[-1] if self._pieces else None
        if last is not None and last.obj is self._staging:  # staged bytes just before: grow that piece
            self._pieces[-1] = memoryview(self._staging)[start - len(last):end]
        else:
            self._pieces.append(memoryview(self._staging)[start:end])

    def _take_part(self) -> tuple[PartBody, bytearray | None]:
        body, staging = PartBody(self._pieces), self._staging
        self._pieces, self._filled, self._staging, self._staged = [], 0, None, 0
        return body, staging

    def _send_part(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        body, staging = self._take_part()
        try:
            for done in [f for f in self._futures if f.done()]:
                done.result()  # a failed part fails the save now, not after the whole upload
            if self._upload_id is None:
                self._upload_id = self._client.create_multipart_upload(
                    Bucket=self._s3.bucket, Key=self._full_key, ChecksumAlgorithm=PART_CHECKSUM_ALGORITHM)["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            if staging is not None:
                self._s3._give_buffer(staging)
            raise self._s3._fail("put", self.key, exc) from exc
        number = len(self._futures) + 1
        self._slots.acquire()  # backpressure: at most max_concurrency parts in flight

        def upload() -> dict[str, Any]:
            try:
                crc = body.checksum()
                reply = self._s3._raw_client().upload_part(
                    Bucket=self._s3.bucket, Key=self._full_key, PartNumber=number, UploadId=self._upload_id,
                    Body=body, ChecksumAlgorithm=PART_CHECKSUM_ALGORITHM, ChecksumCRC32=crc)
                return {"PartNumber": number, "ETag": reply["ETag"], "ChecksumCRC32": crc}
            finally:
                if staging is not None:
                    self._s3._give_buffer(staging)
                self._slots.release()

        self._futures.append(self._s3._executor().submit(upload))

    def close(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.closed = True
        try:
            if self._upload_id is None:
                part, staging = self._take_part()
                body = part.tobytes()
                if staging is not None:
                    self._s3._give_buffer(staging)
                self._client.put_object(Bucket=self._s3.bucket, Key=self._full_key, Body=body)
                return
            if self._filled:
                self._send_part()
            parts = [f.result() for f in self._futures]
            self._client.complete_multipart_upload(Bucket=self._s3.bucket, Key=self._full_key,
                                                   UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except (BotoCoreError, ClientError) as exc:
            self.abort()
            raise self._s3._fail("put", self.key, exc) from exc
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.closed = True
        for f in self._futures:
            f.cancel()
        for f in self._futures:
            with contextlib.suppress(BaseException):
                f.result()
        _, staging = self._take_part()
        if staging is not None:
            self._s3._give_buffer(staging)
        if self._upload_id is not None:
            # Best effort: with the store away this fails too, and the operator's retention
            # aborts the stale upload later (abort_stale_uploads).
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self._s3.bucket, Key=self._full_key,
                                                    UploadId=self._upload_id)
            self._upload_id = None


def s3_client(settings: S3Settings | None = None, *, parameter_validation: bool = True,
              sign_payload: bool = True, endpoint_url: str | None = None,
              credentials: tuple[str, str] | None = None) -> Any:
    """A boto3 S3 client configured as :class:`S3Storage` uses it (thread-safe, shareable).

    Endpoint and credentials from boto3's usual sources (``AWS_ENDPOINT_URL`` selects
    path-style addressing for MinIO and other S3-compatible stores), unless given:
    ``endpoint_url`` and ``credentials`` (access key id, secret access key) serve a caller that
    reaches several stores, such as the operator with each job's own.
    """
    import boto3
    from botocore.config import Config

    s = settings or S3Settings.from_environ()
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        # total_max_attempts counts the first request; botocore's "max_attempts" counts retries
        # only, so it made one attempt more than configured (3 for the operator's 2)
        retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, 2 * s.max_concurrency),
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        s3=({"addressing_style": "path"} if endpoint else {})
        | ({} if sign_payload else {"payload_signing_enabled": False}),
        # Whole-file sha256 in the manifest already guards every byte end to end; the
        # streaming writer's parts carry a CRC32 of their own (torpor.transfer), so
        # botocore's automatic one would be a second.
        signature_version="s3v4",  # requests use it anyway; presigned URLs would default to SigV2
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        parameter_validation=parameter_validation,
    )
    keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
    with _LOADER_LOCK:  # the first client decodes the model once; boto3's session edits the loader
        session = boto3.session.Session(botocore_session=_botocore_session())
        paths = _LOADER.search_paths  # each boto3 session appends its data directory to them
        paths[:] = list(dict.fromkeys(paths))
        return session.client("s3", endpoint_url=endpoint, config=config, **keys)


_LOADER_LOCK = threading.Lock()
_LOADER: Any = None


def _botocore_session() -> Any:
    """A new botocore session (credentials are resolved per client, from the environment as it
    is then) that shares one data loader with every other: botocore's decoded S3 model and
    endpoint rules, ~13 MiB, are then held once per process instead of once per client. The
    operator keeps a client per endpoint and Secret version, so that was 13 MiB per team's
    credentials; with the shared loader a further client costs ~0.5 MiB (bench/README.md).
    Called with ``_LOADER_LOCK`` held."""
    import botocore.loaders
    import botocore.session

    global _LOADER
    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))
    session = botocore.session.Session()
    session.register_component("data_loader", _LOADER)
    return session


def open_storage(uri: str | os.PathLike[str], *, s3: S3Settings | None = None, client: Any = None) -> Storage:
    """Open a store from ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    ``client`` (a boto3 S3 client, see :func:`s3_client`) is shared by S3 stores opened with it.

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
        return S3Storage(bucket, prefix, s3, client=client)
    if uri.startswith("file://"):
        return LocalStorage(uri[len("file://"):])
    if "://" in uri:
        raise ValueError(f"storage uri {uri!r} has an unsupported scheme; use a path, file:// or s3://")
    return LocalStorage(uri)
