"""Chunked, authenticated encryption of checkpoint shards (``enc_key`` / ``enc_mode``).

Torch-free: it sees bytes only, so the same code encrypts a shard while it streams to S3 and
decrypts it on load without ever holding more than one chunk of plaintext at a time.

Format (version 1), all integers big-endian::

    header   magic b"TORPENC" | version u8 | mode u8 | 3 zero bytes | chunk_size u32
             | salt 16 bytes | key_check 16 bytes                        (48 bytes)
    chunks   AES-GCM:          ciphertext | tag 16
             AES-CBC, SM4-CBC: iv 16 | ciphertext (PKCS7-padded) | HMAC-SHA256 32

Why it is built this way:

* **A fresh key per shard.** The cipher key and (CBC) the MAC key are derived from
  ``enc_key`` with HKDF-SHA256 over the random ``salt``, so a GCM nonce can be the chunk
  index without ever repeating under one key, and the MAC key is never the cipher key.
* **Chunks bound to their place.** Every chunk's AAD (GCM) or MAC input (CBC) is the header,
  the chunk index and a final-chunk flag: reordered, dropped, duplicated, appended or cut-off
  chunks all fail to authenticate. Every chunk but the last holds exactly ``chunk_size``
  plaintext bytes and the last one is flagged final, so a file cut at a chunk boundary is
  refused too (its new last chunk was not written as final).
* **Encrypt-then-MAC for CBC.** The HMAC covers the IV and the ciphertext and is checked
  (in constant time) before anything is decrypted, so padding is never inspected on forged
  input.
* **A key check in the header** (HMAC of the header under a derived key) tells "wrong key"
  apart from "modified chunk" in the error message, before any chunk is touched.

The key itself is never written anywhere: not in the header, the manifest or a log line
(``repr`` of :class:`Encryption` hides it).
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from torpor.errors import IntegrityError

MAGIC = b"TORPENC"
VERSION = 1
MODES = ("AES-GCM", "AES-CBC", "SM4-CBC")
KEY_LENGTHS = {"AES-GCM": (16, 24, 32), "AES-CBC": (16, 24, 32), "SM4-CBC": (16,)}
"""Valid ``enc_key`` lengths in bytes per mode."""
_MODE_IDS = {"AES-GCM": 1, "AES-CBC": 2, "SM4-CBC": 3}
_HEAD = struct.Struct(">7sBB3sI16s")
HEADER_SIZE = _HEAD.size + 16
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""Plaintext bytes per chunk: large enough that per-chunk overhead (48-64 bytes, one call
into OpenSSL) is noise, small enough that decrypting holds little memory."""
MAX_CHUNK_SIZE = 1 << 30
_TAG = 16
_IV = 16
_MAC = 32
_BLOCK = 16


def check_key(key: object, mode: object) -> tuple[bytes, str]:
    """Validate ``enc_key`` and ``enc_mode`` together and return them.

    Raises:
        TypeError: ``key`` is not bytes.
        ValueError: an unknown mode, or a key length the mode does not take; the message
            names both the length and the mode (never the key).
    """
    if mode not in MODES:
        raise ValueError(f"enc_mode must be one of {MODES}, got {mode!r}")
    if not isinstance(key, bytes | bytearray):
        raise TypeError(f"enc_key must be bytes, got {type(key).__name__}")
    lengths = KEY_LENGTHS[str(mode)]
    if len(key) not in lengths:
        need = str(lengths[0]) if len(lengths) == 1 else ", ".join(map(str, lengths[:-1])) + f" or {lengths[-1]}"
        raise ValueError(f"enc_key of {len(key)} bytes does not fit enc_mode={mode!r}, which needs {need} bytes")
    return bytes(key), str(mode)


def parse_key(raw: bytes, source: str) -> bytes:
    """Key material from a file or variable: raw bytes, or text ``hex:…`` / ``base64:…``.

    A Kubernetes Secret mounted as a file holds the raw key bytes; text prefixed ``hex:`` or
    ``base64:`` (a trailing newline is ignored) is decoded. Whether the length suits the
    mode is checked later, with the mode (:func:`check_key`).

    Raises:
        ValueError: an empty key or undecodable text; the message names ``source``, never
            the key.
    """
    import base64
    import binascii

    text = raw.strip()
    for prefix, decode in ((b"hex:", bytes.fromhex), (b"base64:", base64.b64decode)):
        if text.startswith(prefix):
            try:
                key = decode(text[len(prefix):].decode("ascii"))  # type: ignore[operator]
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise ValueError(f"{source}: the key after {prefix.decode()!r} is not valid") from None
            break
    else:
        key = raw
    if not key:
        raise ValueError(f"{source}: the encryption key is empty")
    return bytes(key)


def _derive(key: bytes, salt: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, b"torpor-enc v1 " + purpose).derive(key)


def _chunk_aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


@dataclass(frozen=True)
class Encryption:
    """A validated key and mode; encrypts and decrypts whole streams of chunks.

    Args:
        key: ``enc_key``; 16, 24 or 32 bytes for AES, 16 for SM4.
        mode: ``enc_mode``: ``AES-GCM``, ``AES-CBC`` or ``SM4-CBC``.
        chunk_size: plaintext bytes per chunk (a multiple of 16).

    Raises:
        ValueError: see :func:`check_key`; a chunk size that is not a positive multiple of 16.
    """

    key: bytes = field(repr=False)
    mode: str = "AES-GCM"
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        check_key(self.key, self.mode)
        size = self.chunk_size
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CHUNK_SIZE or size % _BLOCK:
            raise ValueError(f"chunk_size must be a positive multiple of 16 up to {MAX_CHUNK_SIZE}, got {size!r}")

    def encrypted_size(self, plain_size: int) -> int:
        """Bytes of the encrypted form of ``plain_size`` plaintext bytes."""
        full, rest = divmod(plain_size, self.chunk_size)
        if rest == 0 and full > 0:
            full, rest = full - 1, self.chunk_size
        return HEADER_SIZE + full * self._record(self.chunk_size) + self._record(rest)

    def _record(self, plain: int) -> int:
        if self.mode == "AES-GCM":
            return plain + _TAG
        return _IV + (plain // _BLOCK + 1) * _BLOCK + _MAC

    def encryptor(self) -> ChunkEncryptor:
        """A fresh stream encryptor (new salt, so new keys)."""
        return ChunkEncryptor(self)

    def encrypt(self, data: bytes | memoryview) -> bytes:
        """Encrypt a whole buffer (tests, small files); streams use :meth:`encryptor`."""
        enc = self.encryptor()
        return b"".join([*enc.update(data), *enc.finalize()])

    def decrypt_chunks(self, pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
        """Decrypt an encrypted stream given in pieces of any size, yielding plaintext chunks.

        Every chunk is authenticated before it is yielded, but a caller that needs the whole
        plaintext must not act on it before the iterator is exhausted: only the end proves
        nothing was cut off.

        Raises:
            IntegrityError: not a torpor-encrypted stream, another mode, a wrong key,
                or any modified, reordered, missing, extra or truncated byte.
        """
        return _decrypt(self, pieces)

    def decrypt(self, data: bytes | memoryview) -> bytes:
        """Decrypt a whole buffer; nothing is returned unless every chunk authenticates."""
        return b"".join(self.decrypt_chunks([data]))


def is_encrypted(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts with the torpor encryption header's magic."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def encrypted_mode(data: bytes | memoryview) -> str | None:
    """The mode named in an encryption header, or ``None`` for plaintext or an unknown id."""
    if not is_encrypted(data) or len(data) < _HEAD.size:
        return None
    mode_id = data[len(MAGIC) + 1]
    return next((m for m, i in _MODE_IDS.items() if i == mode_id), None)


class _Keys:
    def __init__(self, enc: Encryption, salt: bytes) -> None:
        self.mode = enc.mode
        cipher_len = len(enc.key)
        self.cipher_key = _derive(enc.key, salt, b"cipher " + enc.mode.encode(), cipher_len)
        self.mac_key = _derive(enc.key, salt, b"mac", 32) if enc.mode != "AES-GCM" else b""
        self.check_key = _derive(enc.key, salt, b"check", 32)
        self.gcm = AESGCM(self.cipher_key) if enc.mode == "AES-GCM" else None

    def block(self) -> algorithms.BlockCipherAlgorithm:
        return algorithms.SM4(self.cipher_key) if self.mode == "SM4-CBC" else algorithms.AES(self.cipher_key)

    def seal(self, header: bytes, index: int, final: bool, plain: bytes | memoryview) -> bytes:
        aad = _chunk_aad(header, index, final)
        if self.gcm is not None:
            return self.gcm.encrypt(struct.pack(">4xQ", index), plain, aad)
        iv = os.urandom(_IV)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(bytes(plain)) + padder.finalize()
        enc = Cipher(self.block(), modes.CBC(iv)).encryptor()
        body = iv + enc.update(padded) + enc.finalize()
        return body + hmac.new(self.mac_key, aad + body, sha256).digest()

    def open(self, header: bytes, index: int, final: bool, record: bytes | bytearray | memoryview) -> bytes:
        aad = _chunk_aad(header, index, final)
        if self.gcm is not None:
            if len(record) < _TAG:
                raise IntegrityError(f"encrypted chunk {index} is truncated ({len(record)} bytes)")
            try:
                return self.gcm.decrypt(struct.pack(">4xQ", index), record, aad)
            except InvalidTag:
                raise IntegrityError(
                    f"encrypted chunk {index} failed authentication (AES-GCM tag mismatch): the data was "
                    "modified, reordered or truncated; nothing was loaded") from None
        if len(record) < _IV + _BLOCK + _MAC or (len(record) - _IV - _MAC) % _BLOCK:
            raise IntegrityError(f"encrypted chunk {index} has an impossible length {len(record)}; nothing was loaded")
        body, mac = bytes(record[:-_MAC]), bytes(record[-_MAC:])
        if not hmac.compare_digest(hmac.new(self.mac_key, aad + body, sha256).digest(), mac):
            raise IntegrityError(
                f"encrypted chunk {index} failed authentication (HMAC-SHA256 mismatch, {self.mode}): the data was "
                "modified, reordered or truncated; nothing was loaded")
        dec = Cipher(self.block(), modes.CBC(body[:_IV])).decryptor()
        padded = dec.update(body[_IV:]) + dec.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:  # cannot happen for authenticated data unless the writer was broken
            raise IntegrityError(f"encrypted chunk {index} has bad padding after authenticating") from None


def _header(enc: Encryption, salt: bytes, keys: _Keys) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, _MODE_IDS[enc.mode], b"\0\0\0", enc.chunk_size, salt)
    return head + hmac.new(keys.check_key, head, sha256).digest()[:16]


class ChunkEncryptor:
    """Encrypts a stream fed in pieces of any size; memory stays at one chunk.

    ``update`` returns the encrypted records completed so far (the header first); ``finalize``
    returns the rest, ending with the chunk flagged final. A chunk is only sealed once the
    next byte arrives, because until then it might be the last one.
    """

    def __init__(self, enc: Encryption) -> None:
        """Start a stream with a fresh random salt."""
        salt = os.urandom(16)
        self._keys = _Keys(enc, salt)
        self._size = enc.chunk_size
        self._header = _header(enc, salt, self._keys)
        self._pending = bytearray()
        self._index = 0
        self._started = False
        self._done = False

    def update(self, data: bytes | memoryview) -> list[bytes]:
        """Feed plaintext; returns finished records (possibly none)."""
        if self._done:
            raise ValueError("ChunkEncryptor.update after finalize")
        out = self._start()
        view = memoryview(data).cast("B")
        size = self._size
        while len(view):
            if len(self._pending) == size:
                out.append(self._keys.seal(self._header, self._index, False, self._pending))
                self._index += 1
                self._pending.clear()
            if not self._pending and len(view) > size:
                # Whole chunks straight from the caller's buffer: no copy into ``_pending``.
                out.append(self._keys.seal(self._header, self._index, False, view[:size]))
                self._index += 1
                view = view[size:]
                continue
            take = min(size - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
        return out

    def finalize(self) -> list[bytes]:
        """Seal the last chunk (possibly empty) as final."""
        if self._done:
            raise ValueError("ChunkEncryptor.finalize called twice")
        out = self._start()
        out.append(self._keys.seal(self._header, self._index, True, self._pending))
        self._pending = bytearray()
        self._done = True
        return out

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [self._header]


def _parse_header(enc: Encryption, head: bytes) -> tuple[_Keys, int]:
    magic, version, mode_id, reserved, chunk_size, salt = _HEAD.unpack(head[: _HEAD.size])
    if magic != MAGIC:
        raise IntegrityError("not a torpor-encrypted shard (no encryption header); refusing to load it")
    if version != VERSION:
        raise IntegrityError(f"encryption format version {version} is not supported (this torpor reads {VERSION})")
    mode = next((m for m, i in _MODE_IDS.items() if i == mode_id), None)
    if mode is None or reserved != b"\0\0\0" or not 0 < chunk_size <= MAX_CHUNK_SIZE or chunk_size % _BLOCK:
        raise IntegrityError("the encryption header is malformed; the shard was modified, refusing to load it")
    if mode != enc.mode:
        raise IntegrityError(f"the shard was encrypted with {mode}, but enc_mode is {enc.mode!r}; nothing was loaded")
    keys = _Keys(Encryption(enc.key, mode, chunk_size), salt)
    expected = hmac.new(keys.check_key, head[: _HEAD.size], sha256).digest()[:16]
    if not hmac.compare_digest(expected, head[_HEAD.size:HEADER_SIZE]):
        raise IntegrityError(
            f"wrong encryption key for this shard ({mode}), or its header was modified; nothing was loaded")
    return keys, chunk_size


def _decrypt(enc: Encryption, pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    buf = bytearray()
    keys: _Keys | None = None
    header = b""
    record = 0
    index = 0
    for piece in pieces:
        buf += piece
        pos = 0
        if keys is None:
            if len(buf) < HEADER_SIZE:
                continue
            header = bytes(buf[:HEADER_SIZE])
            keys, chunk_size = _parse_header(enc, header)
            record = Encryption(enc.key, enc.mode, chunk_size)._record(chunk_size)
            pos = HEADER_SIZE
        # Keep at least one record back: only the end of the stream says which one is final.
        view = memoryview(buf)
        while len(buf) - pos > record:
            yield keys.open(header, index, False, view[pos:pos + record])
            index += 1
            pos += record
        view.release()
        del buf[:pos]
    if keys is None:
        raise IntegrityError(f"encrypted shard is truncated inside its header ({len(buf)} bytes); nothing was loaded")
    yield keys.open(header, index, True, buf)
