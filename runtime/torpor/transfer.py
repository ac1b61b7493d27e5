"""The two S3 request paths a checkpoint's bytes take, tuned from measurements.

Both exist because boto3's defaults spend the CPU a two-core trainer needs elsewhere
(figures in ``bench/README.md``):

* **Uploads** carry a CRC32 per part (``x-amz-checksum-crc32``, which the server checks)
  instead of SigV4's sha256 of the payload. Over plain HTTP botocore signs every part's
  sha256 (one full pass on the client) and the server re-hashes it to check (another pass);
  a CRC32 costs a fifth of one, still catches corruption in transit, and the shard's sha256
  in the manifest guards every byte end to end at load time. Over HTTPS this is what
  botocore does anyway when a part carries a checksum.
* **Ranged reads** go from the socket straight into the caller's buffer. urllib3 2.x, under
  botocore, implements ``readinto`` as ``read`` plus a copy, so each part costs a fresh
  allocation and two copies; a presigned GET over ``http.client`` lets ``readinto`` hand
  the buffer to ``recv_into``. Where the request cannot go direct (a proxy is configured)
  the caller falls back to botocore.

Torch-free, Kubernetes-free.
"""

from __future__ import annotations

import base64
import http.client
import random
import ssl
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from torpor.errors import IntegrityError, StorageError

PART_CHECKSUM_ALGORITHM = "CRC32"
"""The S3 ``ChecksumAlgorithm`` of every uploaded part."""


def part_checksum(*pieces: bytes | bytearray | memoryview) -> str:
    """Base64 of the big-endian CRC32 of the pieces, in order: ``x-amz-checksum-crc32``.

    ``zlib.crc32`` releases the GIL on large buffers, so upload threads compute theirs in
    parallel.
    """
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


class PartBody:
    """One upload part made of several buffers, sent without joining them.

    A part is usually a few hundred bytes of torch's zip headers (staged) followed by many
    MiB of a tensor's own memory (lent): joining them would copy the tensor. botocore takes
    the ``len()`` for ``Content-Length``; urllib3 iterates and hands each buffer to
    ``sendall``; a retry calls ``seek(0)``, after which the iteration simply starts again.
    """

    def __init__(self, pieces: list[memoryview]) -> None:
        """Wrap ``pieces`` (kept alive and unchanged by the caller until the upload returns)."""
        self._pieces = pieces
        self._size = sum(len(p) for p in pieces)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Any:
        return iter(self._pieces)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Rewind for a retry (the only seek botocore makes)."""
        if (offset, whence) != (0, 0):
            raise ValueError(f"PartBody can only rewind to the start, got seek({offset}, {whence})")
        return 0

    def tell(self) -> int:
        """Always at the start: iteration is stateless."""
        return 0

    def checksum(self) -> str:
        """:func:`part_checksum` of the whole part."""
        return part_checksum(*self._pieces)

    def tobytes(self) -> bytes:
        """The part as one ``bytes`` (for small objects sent in one PUT)."""
        return b"".join(self._pieces)


def direct_reads_possible(url: str) -> bool:
    """Whether a GET of ``url`` may bypass botocore: not when a proxy would carry it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies:
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname or ""))


@dataclass(frozen=True)
class RangeReply:
    """What one ranged GET returned."""

    received: int
    """Bytes written into the buffer."""
    total: int
    """The object's size from ``Content-Range``, or -1 when the server sent none."""


class RangeReader:
    """Ranged GETs of one presigned URL, each into a slice of the caller's buffer.

    One keep-alive connection per calling thread. Connection failures, timeouts and 5xx
    replies are retried with jittered exponential backoff up to ``max_attempts``; 404 raises
    ``FileNotFoundError``, 416 (the object is shorter than asked) raises
    :class:`~torpor.errors.IntegrityError`, any other reply raises
    :class:`~torpor.errors.StorageError` with the server's status and error code.
    """

    def __init__(self, url: str, *, name: str, max_attempts: int, timeout: float,
                 ca_bundle: str | None = None) -> None:
        """Prepare reads of ``url`` (a presigned GetObject URL, named ``name`` in messages,
        e.g. ``s3://bucket/key``: the URL carries a signature); no connection is made yet."""
        parts = urlsplit(url)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._display = name
        self._max_attempts = max_attempts
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if parts.scheme == "https" else None
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def read_into(self, view: memoryview, start: int) -> RangeReply:
        """Fill ``view`` with the object's bytes from ``start`` (fewer at the object's end)."""
        for attempt in range(1, self._max_attempts + 1):
            try:
                return self._read_once(view, start)
            except (FileNotFoundError, IntegrityError):
                raise
            except (OSError, http.client.HTTPException, _Retryable) as exc:
                self._drop_connection()
                if attempt == self._max_attempts:
                    raise StorageError(f"GET {self._display} bytes {start}-{start + len(view) - 1} failed after "
                                       f"{attempt} attempts: {exc}") from exc
                time.sleep(min(20.0, 0.1 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_once(self, view: memoryview, start: int) -> RangeReply:
        conn = self._connection()
        conn.request("GET", self._target, headers={"Range": f"bytes={start}-{start + len(view) - 1}"})
        reply = conn.getresponse()
        if reply.status not in (200, 206):
            body = reply.read()
            code = _error_code(body)
            if reply.status == 404:
                raise FileNotFoundError(self._display)
            if reply.status == 416:
                raise IntegrityError(f"{self._display}: shorter than asked (bytes from {start}); the object is "
                                     "truncated or was replaced, refusing to load it")
            if reply.status >= 500 or reply.status == 429:
                raise _Retryable(f"HTTP {reply.status} {code}")
            raise StorageError(f"GET {self._display}: HTTP {reply.status} {code}")
        if reply.status == 200:  # the server ignored Range: the whole object follows
            if start:
                reply.read()
                raise StorageError(f"GET {self._display}: the server ignored the Range header")
            total = int(reply.getheader("Content-Length") or -1)
        else:
            total = _content_range_total(reply.getheader("Content-Range"))
        length = reply.getheader("Content-Length")
        want = min(len(view), int(length)) if length and length.isdigit() else len(view)
        got = 0
        while got < want:
            n = reply.readinto(view[got:want])  # recv_into the caller's memory: no intermediate copy
            if not n:
                break
            got += n
        if got < want and length:  # the connection dropped mid-body: worth another attempt
            raise _Retryable(f"connection closed after {got} of {want} bytes")
        if not reply.isclosed():  # more bytes than asked (a 200 for a larger object): drain
            reply.read()
        return RangeReply(got, total)

    def close(self) -> None:
        """Close every connection this reader opened, from whichever thread."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()


class _Retryable(Exception):
    """A reply worth another attempt (5xx, throttling)."""


def _content_range_total(header: str | None) -> int:
    tail = (header or "").rpartition("/")[2]
    return int(tail) if tail.isdigit() else -1


def _error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 error document, for messages."""
    text = body[:4096].decode("utf-8", "replace")
    start = text.find("<Code>")
    end = text.find("</Code>")
    return text[start + 6:end] if 0 <= start < end else text[:120].strip()


def presigned_get(client: Any, bucket: str, key: str, expires: int = 3600) -> str:
    """A presigned GetObject URL (signed locally, no request made)."""
    url: str = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)
    return url
