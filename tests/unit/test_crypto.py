"""Chunked authenticated encryption: round trips, and every kind of tampering refused."""

from __future__ import annotations

import os
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.crypto import (
    HEADER_SIZE,
    MODES,
    VERSION,
    Encryption,
    check_key,
    encrypted_mode,
    is_encrypted,
    manifest_tag,
    parse_key,
    place_context,
)
from torpor.env import read_enc_key
from torpor.errors import IntegrityError

KEYS = {"AES-GCM": b"k" * 32, "AES-CBC": b"c" * 24, "SM4-CBC": b"s" * 16}
SMALL = 64  # bytes per chunk in most tests, so a few hundred bytes make many chunks


def enc(mode: str, chunk_size: int = SMALL) -> Encryption:
    return Encryption(KEYS[mode], mode, chunk_size)


def records(e: Encryption, blob: bytes) -> list[bytes]:
    """Split an encrypted blob into its header and its chunk records."""
    size = e.encrypted_size(e.chunk_size + 1) - e.encrypted_size(1)  # one full record
    body = blob[HEADER_SIZE:]
    return [blob[:HEADER_SIZE]] + [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 63, 64, 65, 128, 129, 1000])
def test_round_trip_every_mode_and_boundary(mode: str, size: int) -> None:
    e = enc(mode)
    data = os.urandom(size)
    blob = e.encrypt(data)
    assert is_encrypted(blob) and encrypted_mode(blob) == mode
    assert len(blob) == e.encrypted_size(size)
    assert e.decrypt(blob) == data
    assert size < 16 or data not in blob  # no plaintext run survives (tiny ones may occur by chance)


@pytest.mark.parametrize("mode", MODES)
def test_multi_megabyte_payload_with_the_default_chunk_size(mode: str) -> None:
    e = Encryption(KEYS[mode], mode)
    data = os.urandom(9 * 1024 * 1024 + 7)  # three chunks, the last one short
    assert e.decrypt(e.encrypt(data)) == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=700), cuts=st.lists(st.integers(0, 700), max_size=6),
       mode=st.sampled_from(MODES))
def test_streaming_in_any_pieces_equals_one_shot(data: bytes, cuts: list[int], mode: str) -> None:
    e = enc(mode)
    encryptor = e.encryptor()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    out = []
    for a, b in pairwise(bounds):
        out += encryptor.update(data[a:b])
    blob = b"".join([*out, *encryptor.finalize()])
    assert e.decrypt(blob) == data
    marks = sorted({0, len(blob), *(c % (len(blob) + 1) for c in cuts)})
    pieces = [blob[a:b] for a, b in pairwise(marks)]
    assert b"".join(e.decrypt_chunks(pieces)) == data


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=400), where=st.integers(min_value=0), bit=st.integers(0, 7),
       mode=st.sampled_from(MODES))
def test_a_flipped_bit_anywhere_is_refused(data: bytes, where: int, bit: int, mode: str) -> None:
    e = enc(mode)
    blob = bytearray(e.encrypt(data))
    blob[where % len(blob)] ^= 1 << bit
    with pytest.raises(IntegrityError):
        e.decrypt(bytes(blob))


@pytest.mark.parametrize("mode", MODES)
def test_truncation_anywhere_is_refused(mode: str) -> None:
    e = enc(mode)
    blob = e.encrypt(os.urandom(5 * SMALL + 10))
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            e.decrypt(blob[:cut])


@pytest.mark.parametrize("mode", MODES)
def test_truncation_at_a_chunk_boundary_is_refused(mode: str) -> None:
    e = enc(mode)
    parts = records(e, e.encrypt(os.urandom(4 * SMALL)))  # header + 4 records, the last one final
    assert len(parts) == 5
    with pytest.raises(IntegrityError, match="chunk 2"):
        e.decrypt(b"".join(parts[:4]))  # chunk 2 was not written as the final one


@pytest.mark.parametrize("mode", MODES)
def test_reordered_dropped_duplicated_and_appended_chunks_are_refused(mode: str) -> None:
    e = enc(mode)
    head, *chunks = records(e, e.encrypt(os.urandom(4 * SMALL + 5)))
    assert len(chunks) == 5
    variants = {
        "swapped": [chunks[1], chunks[0], *chunks[2:]],
        "dropped": [chunks[0], *chunks[2:]],
        "duplicated": [chunks[0], chunks[0], *chunks[1:]],
        "appended": [*chunks, chunks[0]],
    }
    for what, body in variants.items():
        with pytest.raises(IntegrityError):
            e.decrypt(head + b"".join(body))
            pytest.fail(what)


@pytest.mark.parametrize("mode", MODES)
def test_chunks_from_another_file_under_the_same_key_are_refused(mode: str) -> None:
    e = enc(mode)
    head_a, *a = records(e, e.encrypt(os.urandom(3 * SMALL)))
    _, *b = records(e, e.encrypt(os.urandom(3 * SMALL)))
    with pytest.raises(IntegrityError):
        e.decrypt(head_a + a[0] + b[1] + a[2])


@pytest.mark.parametrize("mode", MODES)
def test_wrong_key_is_refused_and_said_so(mode: str) -> None:
    blob = enc(mode).encrypt(b"weights" * 50)
    other = Encryption(bytes(len(KEYS[mode])), mode, SMALL)
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        other.decrypt(blob)


def test_wrong_mode_and_plaintext_are_refused() -> None:
    blob = enc("AES-GCM").encrypt(b"x" * 100)
    with pytest.raises(IntegrityError, match=r"AES-GCM.*AES-CBC"):
        Encryption(b"k" * 32, "AES-CBC").decrypt(blob)
    with pytest.raises(IntegrityError, match="not a torpor-encrypted"):
        enc("AES-GCM").decrypt(b"PK\x03\x04" + b"\0" * 100)


@pytest.mark.parametrize(
    ("key", "mode", "fragments"),
    [
        (b"k" * 20, "AES-GCM", ["20 bytes", "'AES-GCM'", "16, 24 or 32"]),
        (b"k" * 32, "SM4-CBC", ["32 bytes", "'SM4-CBC'", "16 bytes"]),
        (b"", "AES-CBC", ["0 bytes", "'AES-CBC'"]),
        (b"k" * 16, "AES-ECB", ["enc_mode", "'AES-ECB'"]),
    ],
)
def test_wrong_key_length_or_mode_names_both(key: bytes, mode: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        check_key(key, mode)
    for fragment in fragments:
        assert fragment in str(info.value)
    with pytest.raises(ValueError):
        Encryption(key, mode)


def test_the_key_is_never_in_a_repr_or_the_ciphertext() -> None:
    key = b"supersecretkey!!"
    e = Encryption(key, "AES-GCM")
    assert key.decode() not in repr(e)
    assert key not in e.encrypt(b"\0" * 1000)


def test_keys_from_a_file_or_the_environment(tmp_path) -> None:
    raw = os.urandom(32)
    (tmp_path / "key").write_bytes(raw)
    (tmp_path / "hex").write_text("hex:" + raw.hex() + "\n")
    assert read_enc_key({"TORPOR_ENC_KEY_FILE": str(tmp_path / "key")}) == raw
    assert read_enc_key({"TORPOR_ENC_KEY_FILE": str(tmp_path / "hex"), "TORPOR_ENC_KEY": "ignored"}) == raw
    assert read_enc_key({"TORPOR_ENC_KEY": "base64:" + __import__("base64").b64encode(raw).decode()}) == raw
    assert read_enc_key({}) is None
    with pytest.raises(ValueError, match=r"TORPOR_ENC_KEY_FILE=.*cannot be read"):
        read_enc_key({"TORPOR_ENC_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="TORPOR_ENC_KEY") as info:
        parse_key(b"hex:zz" + raw.hex().encode(), "TORPOR_ENC_KEY")
    assert raw.hex() not in str(info.value)


def test_the_crypto_module_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, torpor.crypto, torpor.env\nassert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- binding to a place (format 2) ---------------------------------------------------------

PLACE_A = place_context("rank_0/CKP-1_4.ckpt", "run-a:4")


@pytest.mark.parametrize("mode", MODES)
def test_a_file_sealed_for_one_place_is_refused_in_another(mode: str) -> None:
    e = enc(mode)
    blob = e.encrypt(os.urandom(3 * SMALL + 1), PLACE_A)
    assert e.decrypt(blob, PLACE_A)
    others = {
        "another rank": place_context("rank_1/CKP-1_4.ckpt", "run-a:4"),
        "another checkpoint": place_context("rank_0/CKP-1_8.ckpt", "run-a:4"),
        "another kind": place_context("rank_0/CKP-1_4.trainable.pt", "run-a:4"),
        "another save": place_context("rank_0/CKP-1_4.ckpt", "run-b:4"),
        "no place": b"",
    }
    for what, place in others.items():
        with pytest.raises(IntegrityError, match="another place"):
            e.decrypt(blob, place)
            pytest.fail(what)
        with pytest.raises(IntegrityError, match="another place"):
            b"".join(e.decrypt_chunks([blob], place))


@pytest.mark.parametrize("mode", MODES)
def test_the_place_is_authenticated_by_every_chunk_not_only_the_header(mode: str) -> None:
    # A header copied from a file of the right place onto chunks sealed for another one.
    e = enc(mode)
    data = os.urandom(3 * SMALL)
    right = records(e, e.encrypt(data, PLACE_A))
    wrong = records(e, e.encrypt(data, place_context("rank_1/CKP-1_4.ckpt", "run-a:4")))
    with pytest.raises(IntegrityError):
        e.decrypt(right[0] + b"".join(wrong[1:]), PLACE_A)


def test_format_versions_are_checked_and_the_unbound_format_1_is_refused_by_name() -> None:
    blob = bytearray(enc("AES-GCM").encrypt(b"x" * 100, PLACE_A))
    assert blob[7] == VERSION == 2
    blob[7] = 1
    with pytest.raises(IntegrityError, match=r"format version 1.*not bound to its place"):
        enc("AES-GCM").decrypt(bytes(blob), PLACE_A)
    blob[7] = 3
    with pytest.raises(IntegrityError, match=r"format version 3 is not supported.*reads 2"):
        enc("AES-GCM").decrypt(bytes(blob), PLACE_A)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000])
def test_decrypting_in_place_equals_decrypting_a_stream(mode: str, size: int) -> None:
    e = enc(mode)
    data = os.urandom(size)
    buf = bytearray(e.encrypt(data, PLACE_A))
    n = e.decrypt_into(buf, PLACE_A)
    assert bytes(buf[:n]) == data
    broken = bytearray(e.encrypt(data, PLACE_A))
    broken[-1] ^= 1
    with pytest.raises(IntegrityError):
        e.decrypt_into(broken, PLACE_A)
    with pytest.raises(IntegrityError):
        e.decrypt_into(bytearray(e.encrypt(data, PLACE_A))[:-1], PLACE_A)


def test_manifest_tags_depend_on_the_key_and_every_byte() -> None:
    text = b'{"name":"CKP-1_4","rank":0}'
    tag = manifest_tag(b"k" * 32, text)
    assert tag.startswith("hmac-sha256:") and manifest_tag(b"k" * 32, text) == tag
    assert manifest_tag(b"j" * 32, text) != tag
    assert manifest_tag(b"k" * 32, text.replace(b"0", b"1")) != tag
    assert (b"k" * 32).hex() not in tag
