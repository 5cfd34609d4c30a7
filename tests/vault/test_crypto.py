"""Token sealing: round trips, and every kind of tampering is one clear error."""

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vault import crypto
from vault.errors import DecryptionError

KEY = bytes(range(32))
KID = uuid.UUID(int=7)
CTX = {"owner": "smiths", "identity": "u1", "artifact": "a1", "kind": "face", "model_id": "m"}


@given(plaintext=st.binary(max_size=4096),
       context=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8),
                               min_size=1, max_size=4))
def test_round_trip_any_plaintext_and_context(plaintext, context):
    token = crypto.seal(KEY, plaintext, key_id=KID, key_version=3, context=context)
    assert crypto.open_token(KEY, token, context=context) == plaintext
    header = crypto.read_header(token)
    assert (header.key_id, header.key_version, header.format_version) == (KID, 3, 1)
    assert len(token) == len(plaintext) + crypto.OVERHEAD


def test_nonces_are_fresh():
    a = crypto.seal(KEY, b"same", key_id=KID, key_version=1, context=CTX)
    b = crypto.seal(KEY, b"same", key_id=KID, key_version=1, context=CTX)
    assert a != b


@pytest.mark.parametrize("field", ["owner", "identity", "artifact", "kind", "model_id"])
def test_another_place_fails(field):
    token = crypto.seal(KEY, b"secret", key_id=KID, key_version=1, context=CTX)
    with pytest.raises(DecryptionError, match="failed authentication"):
        crypto.open_token(KEY, token, context={**CTX, field: "elsewhere"})


def test_every_byte_is_authenticated():
    token = crypto.seal(KEY, b"0123456789abcdef", key_id=KID, key_version=1, context=CTX)
    for i in range(len(token)):
        bad = bytearray(token)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            crypto.open_token(KEY, bytes(bad), context=CTX)


def test_wrong_key_and_truncation():
    token = crypto.seal(KEY, b"secret", key_id=KID, key_version=1, context=CTX)
    with pytest.raises(DecryptionError, match="failed authentication"):
        crypto.open_token(bytes(32), token, context=CTX)
    with pytest.raises(DecryptionError, match="truncated"):
        crypto.open_token(KEY, token[:20], context=CTX)
    with pytest.raises(DecryptionError):
        crypto.open_token(KEY, token[:-1], context=CTX)


def test_not_a_token():
    with pytest.raises(DecryptionError, match="magic"):
        crypto.read_header(b"\x00" * 64)


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)  # quotes, braces, %, é, \x00


@given(fixed=st.dictionaries(st.text(min_size=1, max_size=8), _TEXT, max_size=4),
       varying=st.dictionaries(st.text(min_size=1, max_size=8), _TEXT, min_size=1, max_size=4))
def test_a_context_encoder_gives_the_bytes_of_encode_context(fixed, varying):
    fixed = {k: v for k, v in fixed.items() if k not in varying}
    enc = crypto.ContextEncoder(fixed, list(varying))
    assert enc(*varying.values()) == crypto.encode_context({**fixed, **varying})


def test_open_token_takes_an_encoded_context_with_the_same_checks():
    token = crypto.seal(KEY, b"secret", key_id=KID, key_version=1, context=CTX)
    enc = crypto.ContextEncoder({k: v for k, v in CTX.items() if k != "identity"}, ["identity"])
    assert crypto.open_token(KEY, token, context=enc("u1")) == b"secret"
    with pytest.raises(DecryptionError, match="failed authentication"):
        crypto.open_token(KEY, token, context=enc("u2"))
    with pytest.raises(DecryptionError, match="truncated"):
        crypto.open_token(KEY, token[:20], context=enc("u1"))
    with pytest.raises(TypeError, match="expected 1"):
        enc("u1", "u2")
    with pytest.raises(TypeError, match="once"):
        crypto.ContextEncoder({"identity": "x"}, ["identity"])
