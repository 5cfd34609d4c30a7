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
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Mapping
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


def encode_context(context: Mapping[str, object]) -> bytes:
    """Canonical bytes of an AAD context mapping (keys sorted, compact)."""
    if not isinstance(context, Mapping) or not context:
        raise TypeError("context must be a non-empty mapping")
    return json.dumps(
        {str(k): str(v) for k, v in context.items()}, sort_keys=True, separators=(",", ":")
    ).encode()


def read_header(token: bytes) -> TokenHeader:
    """Parse a token's header without decrypting it (to find its key)."""
    if len(token) < OVERHEAD:
        raise DecryptionError(
            f"ciphertext is truncated: {len(token)} bytes, a token has at least {OVERHEAD}"
        )
    magic, fmt, key_id, key_version = _HEADER.unpack_from(token)
    if magic != MAGIC:
        raise DecryptionError("not an idvault ciphertext (bad magic bytes)")
    if fmt != FORMAT_VERSION:
        raise DecryptionError(f"unsupported ciphertext format version {fmt}")
    return TokenHeader(fmt, uuid.UUID(bytes=key_id), key_version)


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


def open_token(key: bytes, token: bytes, *, context: Mapping[str, object]) -> bytes:
    """Decrypt a token sealed by :func:`seal` for the same ``context``.

    Raises DecryptionError for every failure: wrong key, altered or truncated
    bytes, or a token that belongs to another place.
    """
    read_header(token)
    header = token[:HEADER_BYTES]
    nonce = token[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
    body = token[HEADER_BYTES + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, body, header + encode_context(context))
    except InvalidTag:
        raise DecryptionError(
            "ciphertext failed authentication: it was altered, truncated, moved from "
            "another record, or sealed under another key"
        ) from None
