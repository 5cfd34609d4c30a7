"""Authenticated encryption of vault blobs: one token format, two calls.

``seal(key, plaintext, key_id=..., key_version=..., context=...)`` returns a
self-describing token; ``open_token(key, token, context=...)`` returns the
plaintext or raises :class:`~vault.errors.DecryptionError`. AES-256-GCM from
``cryptography``; the 96-bit nonce is random per token and never chosen by
callers.

Token layout (all integers big-endian)::

    magic  b"idv"          3 bytes
    format 1               1 byte
    key_id                 16 bytes  (UUID of the key that sealed it)
    key_version            4 bytes   (KEK version, or DEK generation)
    nonce                  12 bytes
    ciphertext || tag      len(plaintext) + 16 bytes

The header is authenticated together with ``context``: a mapping of strings
that says where the blob belongs (owner, identity, artifact id, kind, model
id...). It is encoded canonically (sorted JSON), so the same place always
gives the same bytes and a blob copied to another place fails to open.
Bulk readers (an index rebuild) encode many contexts of one shape with a
:class:`ContextEncoder`, which gives the same bytes without a JSON dump each.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.errors import DecryptionError

MAGIC = b"idv"
FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(">3sB16sI")
HEADER_BYTES = _HEADER.size  # 24
OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES


@dataclass(frozen=True)
class TokenHeader:
    format_version: int
    key_id: uuid.UUID
    key_version: int


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return os.urandom(KEY_BYTES)


_escape = json.encoder.encode_basestring_ascii  # what json.dumps uses for str (ensure_ascii)


def encode_context(context: Mapping[str, object]) -> bytes:
    """Canonical bytes of an AAD context mapping (keys sorted, compact)."""
    if not isinstance(context, Mapping) or not context:
        raise TypeError("context must be a non-empty mapping")
    return json.dumps(
        {str(k): str(v) for k, v in context.items()}, sort_keys=True, separators=(",", ":")
    ).encode()


class ContextEncoder:
    """:func:`encode_context` for many contexts with the same keys, some fixed.

    ``ContextEncoder({"kind": "face"}, ("identity", "artifact"))(uid, art_id)`` returns
    exactly ``encode_context({"kind": "face", "identity": uid, "artifact": art_id})``:
    the fixed part is encoded once and a call only escapes the varying values (with the
    escaping ``json.dumps`` uses) into their places, about five times faster.
    """

    def __init__(self, fixed: Mapping[str, object], varying: Sequence[str]) -> None:
        fixed_str = {str(k): str(v) for k, v in fixed.items()}
        slot = {str(k): i for i, k in enumerate(varying)}
        if not (fixed_str or slot) or len(slot) != len(varying) or set(fixed_str) & set(slot):
            raise TypeError("a context needs keys, each either fixed or varying, once")
        def literal(text: str) -> str:  # braces doubled: the template is a str.format one
            return _escape(text).replace("{", "{{").replace("}", "}}")

        items = [literal(k) + ":" + (f"{{{slot[k]}}}" if k in slot else literal(fixed_str[k]))
                 for k in sorted(fixed_str.keys() | slot.keys())]
        self._template = "{{" + ",".join(items) + "}}"
        self._n = len(slot)

    def __call__(self, *values: str) -> bytes:
        """The encoding with ``values`` (strings) for the varying keys, in their order."""
        if len(values) != self._n:
            raise TypeError(f"expected {self._n} context values, got {len(values)}")
        return self._template.format(*map(_escape, values)).encode()


def _check_header(token: bytes) -> None:
    if len(token) < OVERHEAD:
        raise DecryptionError(
            f"ciphertext is truncated: {len(token)} bytes, a token has at least {OVERHEAD}"
        )
    if token[:3] != MAGIC:
        raise DecryptionError("not an idvault ciphertext (bad magic bytes)")
    if token[3] != FORMAT_VERSION:
        raise DecryptionError(f"unsupported ciphertext format version {token[3]}")


def read_header(token: bytes) -> TokenHeader:
    """Parse a token's header without decrypting it (to find its key)."""
    key_id, key_version = read_key(token)
    return TokenHeader(FORMAT_VERSION, uuid.UUID(bytes=key_id), key_version)


def read_key(token: bytes) -> tuple[bytes, int]:
    """The key id (16 raw bytes) and key version of a token, with the checks of
    :func:`read_header` (for bulk readers: no UUID is made)."""
    _check_header(token)
    _, _, key_id, key_version = _HEADER.unpack_from(token)
    return key_id, key_version


def seal(
    key: bytes,
    plaintext: bytes,
    *,
    key_id: uuid.UUID,
    key_version: int,
    context: Mapping[str, object],
) -> bytes:
    """Encrypt and authenticate ``plaintext`` for the place named by ``context``."""
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, key_id.bytes, key_version)
    nonce = os.urandom(NONCE_BYTES)
    body = AESGCM(key).encrypt(nonce, plaintext, header + encode_context(context))
    return header + nonce + body


def open_token(key: bytes, token: bytes, *, context: Mapping[str, object] | bytes) -> bytes:
    """Decrypt a token sealed by :func:`seal` for the same ``context`` (a mapping, or its
    encoding by :func:`encode_context` or a :class:`ContextEncoder`).

    Raises DecryptionError for every failure: wrong key, altered or truncated
    bytes, or a token that belongs to another place.
    """
    _check_header(token)
    header = token[:HEADER_BYTES]
    nonce = token[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
    body = token[HEADER_BYTES + NONCE_BYTES :]
    aad = context if isinstance(context, bytes) else encode_context(context)
    try:
        return AESGCM(key).decrypt(nonce, body, header + aad)
    except InvalidTag:
        raise DecryptionError(
            "ciphertext failed authentication: it was altered, truncated, moved from "
            "another record, or sealed under another key"
        ) from None
