"""Chunked, authenticated encryption of checkpoint shards (``enc_key`` / ``enc_mode``).

Torch-free: it sees bytes only, so the same code encrypts a shard while it streams to S3 and
decrypts it on load without ever holding more than one chunk of plaintext at a time.

Format (version 2), all integers big-endian::

    header   magic b"TORPENC" | version u8 | mode u8 | 3 zero bytes | chunk_size u32
             | salt 16 bytes | key_check 16 bytes | place_check 16 bytes  (64 bytes)
    chunks   AES-GCM:          ciphertext | tag 16
             AES-CBC, SM4-CBC: iv 16 | ciphertext (PKCS7-padded) | HMAC-SHA256 32

Version 1 (torpor before issue 10) had no place check and no place in the chunks' AAD; it is
refused by name, since accepting it would let an attacker swap in an old, unbound file.

Why it is built this way:

* **A fresh key per shard.** The cipher key and (CBC) the MAC key are derived from
  ``enc_key`` with HKDF-SHA256 over the random ``salt``, so a GCM nonce can be the chunk
  index without ever repeating under one key, and the MAC key is never the cipher key.
* **Files bound to their place.** The caller names where the file belongs
  (:func:`place_context`: its key — checkpoint name, rank and file kind — and the save id);
  that digest is in every chunk's authenticated data, so a shard swapped with another
  rank's, copied from another checkpoint or rolled back to an older save of the same name
  fails to authenticate. ``place_check`` (an HMAC of the header and the place) says so in
  the error message before any chunk is touched.
* **Chunks bound to their position.** Every chunk's AAD (GCM) or MAC input (CBC) is the header,
  the place, the chunk index and a final-chunk flag: reordered, dropped, duplicated, appended or cut-off
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
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from torpor.errors import IntegrityError

MAGIC = b"TORPENC"
VERSION = 2
MODES = ("AES-GCM", "AES-CBC", "SM4-CBC")
KEY_LENGTHS = {"AES-GCM": (16, 24, 32), "AES-CBC": (16, 24, 32), "SM4-CBC": (16,)}
"""Valid ``enc_key`` lengths in bytes per mode."""
_MODE_IDS = {"AES-GCM": 1, "AES-CBC": 2, "SM4-CBC": 3}
_HEAD = struct.Struct(">7sBB3sI16s")
HEADER_SIZE = _HEAD.size + 32
_CHECK = 16
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


def _chunk_aad(header: bytes, place: bytes, index: int, final: bool) -> bytes:
    return header + place + struct.pack(">QB", index, 1 if final else 0)


def place_context(key: str, save_id: str) -> bytes:
    """The place a sealed file is bound to: its key and the save that wrote it.

    ``key`` (``rank_1/CKP-1_8.ckpt``) names the checkpoint, the rank and the file kind; the
    save id tells two saves of one name apart. The storage root is left out on purpose: a
    checkpoint copied from a directory to a bucket is still the same checkpoint.
    """
    return sha256(b"torpor-place v1\0" + key.encode() + b"\0" + save_id.encode()).digest()


MANIFEST_TAG_PREFIX = "hmac-sha256:"


def manifest_tag(key: bytes, text: bytes) -> str:
    """The authentication tag of a manifest's signed text (:meth:`Manifest.signed_text`).

    HMAC-SHA256 under a key derived from ``enc_key`` for this purpose only (HKDF), so the tag
    reveals nothing about the cipher keys. Stored in the manifest itself (format 2), where a
    reader without the key (the operator) simply ignores it.
    """
    mac_key = HKDF(hashes.SHA256(), 32, None, b"torpor manifest v2").derive(bytes(key))
    return MANIFEST_TAG_PREFIX + hmac.new(mac_key, text, sha256).hexdigest()


def manifest_tag_matches(key: bytes, text: bytes, tag: str) -> bool:
    """Whether ``tag`` is :func:`manifest_tag` of ``text`` (in constant time)."""
    return hmac.compare_digest(manifest_tag(key, text).encode(), tag.encode())


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

    def encryptor(self, place: bytes = b"") -> ChunkEncryptor:
        """A fresh stream encryptor (new salt, so new keys) for a file bound to ``place``."""
        return ChunkEncryptor(self, place)

    def encrypt(self, data: bytes | memoryview, place: bytes = b"") -> bytes:
        """Encrypt a whole buffer (tests, small files); streams use :meth:`encryptor`."""
        enc = self.encryptor(place)
        return b"".join([*enc.update(data), *enc.finalize()])

    def decrypt_chunks(self, pieces: Iterable[bytes | memoryview], place: bytes = b"") -> Iterator[bytes]:
        """Decrypt an encrypted stream given in pieces of any size, yielding plaintext chunks.

        Every chunk is authenticated before it is yielded, but a caller that needs the whole
        plaintext must not act on it before the iterator is exhausted: only the end proves
        nothing was cut off.

        Raises:
            IntegrityError: not a torpor-encrypted stream, another mode, a wrong key,
                sealed for another ``place``, or any modified, reordered, missing, extra or
                truncated byte.
        """
        return _decrypt(self, pieces, place)

    def decrypt(self, data: bytes | memoryview, place: bytes = b"") -> bytes:
        """Decrypt a whole buffer; nothing is returned unless every chunk authenticates."""
        return b"".join(self.decrypt_chunks([data], place))

    def decrypt_into(self, buffer: bytearray | memoryview | Any, place: bytes = b"") -> int:
        """Decrypt a whole encrypted file held in ``buffer`` in place; returns the plaintext length.

        The plaintext ends up in ``buffer[:n]``. Each plaintext chunk is shorter than its
        record and lands at or before the record's own offset, so it never overwrites a record
        still to be read: a GiB shard is decrypted with one GiB and one chunk of memory, where
        a second buffer would double it. Only a return (not an exception) means every chunk
        authenticated; on an error ``buffer`` holds a mix and must be discarded.

        Raises:
            IntegrityError: as :meth:`decrypt_chunks`.
        """
        return _decrypt_into(self, buffer, place)


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

    def seal(self, header: bytes, place: bytes, index: int, final: bool, plain: bytes | memoryview) -> bytes:
        aad = _chunk_aad(header, place, index, final)
        if self.gcm is not None:
            return self.gcm.encrypt(struct.pack(">4xQ", index), plain, aad)
        iv = os.urandom(_IV)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(bytes(plain)) + padder.finalize()
        enc = Cipher(self.block(), modes.CBC(iv)).encryptor()
        body = iv + enc.update(padded) + enc.finalize()
        return body + hmac.new(self.mac_key, aad + body, sha256).digest()

    def open(self, header: bytes, place: bytes, index: int, final: bool,
             record: bytes | bytearray | memoryview) -> bytes:
        aad = _chunk_aad(header, place, index, final)
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


def _header(enc: Encryption, salt: bytes, keys: _Keys, place: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, _MODE_IDS[enc.mode], b"\0\0\0", enc.chunk_size, salt)
    key_check = hmac.new(keys.check_key, head, sha256).digest()[:_CHECK]
    return head + key_check + _place_check(keys, head + key_check, place)


def _place_check(keys: _Keys, head: bytes, place: bytes) -> bytes:
    return hmac.new(keys.check_key, b"place " + head + place, sha256).digest()[:_CHECK]


class ChunkEncryptor:
    """Encrypts a stream fed in pieces of any size; memory stays at one chunk.

    ``update`` returns the encrypted records completed so far (the header first); ``finalize``
    returns the rest, ending with the chunk flagged final. A chunk is only sealed once the
    next byte arrives, because until then it might be the last one.
    """

    def __init__(self, enc: Encryption, place: bytes = b"") -> None:
        """Start a stream with a fresh random salt, bound to ``place`` (:func:`place_context`)."""
        salt = os.urandom(16)
        self._keys = _Keys(enc, salt)
        self._size = enc.chunk_size
        self._place = bytes(place)
        self._header = _header(enc, salt, self._keys, self._place)
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
                out.append(self._keys.seal(self._header, self._place, self._index, False, self._pending))
                self._index += 1
                self._pending.clear()
            if not self._pending and len(view) > size:
                # Whole chunks straight from the caller's buffer: no copy into ``_pending``.
                out.append(self._keys.seal(self._header, self._place, self._index, False, view[:size]))
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
        out.append(self._keys.seal(self._header, self._place, self._index, True, self._pending))
        self._pending = bytearray()
        self._done = True
        return out

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [self._header]


def _parse_header(enc: Encryption, head: bytes, place: bytes) -> tuple[_Keys, int]:
    magic, version, mode_id, reserved, chunk_size, salt = _HEAD.unpack(head[: _HEAD.size])
    if magic != MAGIC:
        raise IntegrityError("not a torpor-encrypted shard (no encryption header); refusing to load it")
    if version == 1:
        raise IntegrityError("encryption format version 1 (written by an older torpor) is not bound to its place "
                             f"(checkpoint, rank, save), so it is refused; this torpor reads version {VERSION}")
    if version != VERSION:
        raise IntegrityError(f"encryption format version {version} is not supported (this torpor reads {VERSION})")
    mode = next((m for m, i in _MODE_IDS.items() if i == mode_id), None)
    if mode is None or reserved != b"\0\0\0" or not 0 < chunk_size <= MAX_CHUNK_SIZE or chunk_size % _BLOCK:
        raise IntegrityError("the encryption header is malformed; the shard was modified, refusing to load it")
    if mode != enc.mode:
        raise IntegrityError(f"the shard was encrypted with {mode}, but enc_mode is {enc.mode!r}; nothing was loaded")
    keys = _Keys(Encryption(enc.key, mode, chunk_size), salt)
    key_end = _HEAD.size + _CHECK
    expected = hmac.new(keys.check_key, head[: _HEAD.size], sha256).digest()[:_CHECK]
    if not hmac.compare_digest(expected, head[_HEAD.size:key_end]):
        raise IntegrityError(
            f"wrong encryption key for this shard ({mode}), or its header was modified; nothing was loaded")
    if not hmac.compare_digest(_place_check(keys, head[:key_end], place), head[key_end:HEADER_SIZE]):
        raise IntegrityError(
            "the file was sealed for another place (another checkpoint, rank, file kind or save): it was swapped, "
            "copied from another checkpoint or rolled back to an older save; nothing was loaded")
    return keys, chunk_size


def _decrypt(enc: Encryption, pieces: Iterable[bytes | memoryview], place: bytes) -> Iterator[bytes]:
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
            keys, chunk_size = _parse_header(enc, header, place)
            record = Encryption(enc.key, enc.mode, chunk_size)._record(chunk_size)
            pos = HEADER_SIZE
        # Keep at least one record back: only the end of the stream says which one is final.
        view = memoryview(buf)
        while len(buf) - pos > record:
            yield keys.open(header, place, index, False, view[pos:pos + record])
            index += 1
            pos += record
        view.release()
        del buf[:pos]
    if keys is None:
        raise IntegrityError(f"encrypted shard is truncated inside its header ({len(buf)} bytes); nothing was loaded")
    yield keys.open(header, place, index, True, buf)


def _decrypt_into(enc: Encryption, buffer: Any, place: bytes) -> int:
    view = memoryview(buffer).cast("B")
    try:
        end = len(view)
        if end < HEADER_SIZE:
            raise IntegrityError(f"encrypted shard is truncated inside its header ({end} bytes); nothing was loaded")
        header = bytes(view[:HEADER_SIZE])
        keys, chunk_size = _parse_header(enc, header, place)
        record = Encryption(enc.key, enc.mode, chunk_size)._record(chunk_size)
        pos, out, index = HEADER_SIZE, 0, 0
        while True:
            final = end - pos <= record  # as in _decrypt: the last record is the one flagged final
            stop = end if final else pos + record
            plain = keys.open(header, place, index, final, view[pos:stop])
            view[out:out + len(plain)] = plain  # out + len(plain) <= pos: never past an unread record
            out, pos, index = out + len(plain), stop, index + 1
            if final:
                return out
    finally:
        view.release()
