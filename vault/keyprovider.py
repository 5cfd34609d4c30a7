"""Key providers: where the key-encryption key (KEK) comes from.

Three providers, chosen by ``IDVAULT_KEY_PROVIDER``:

``file`` (default)
    A JSON key file (``master.key`` in the data dir, or ``IDVAULT_KEY_FILE``)
    created with mode 0600 by ``idvault init``. It holds every KEK version
    still needed; rotation adds the new version and, once every data key is
    re-wrapped, removes the old ones. Written atomically (temp file, fsync,
    rename), so a kill never leaves it half-written.
``env``
    ``IDVAULT_KEK``: a base64 32-byte key (version 1) or a list of versions,
    ``"2:<base64>,1:<base64>"``. To rotate, add the next version first.
``passphrase``
    ``IDVAULT_PASSPHRASE`` through scrypt (n=2**15, r=8, p=1) with a random
    salt per version kept in the key store. To rotate, also set
    ``IDVAULT_NEW_PASSPHRASE``.

A provider only produces candidate keys; the key store checks each against
the version's stored check value, so a wrong key is reported as wrong rather
than as a decryption failure deep inside a read.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vault.crypto import KEY_BYTES, new_key
from vault.errors import KeyUnavailable

KEY_FILE_FORMAT = "idvault-kek-file/1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


class KeyProvider(ABC):
    name: str

    @abstractmethod
    def candidates(self, version: int, salt: bytes | None) -> list[bytes]:
        """Keys that may be KEK ``version`` (checked by the caller)."""

    @abstractmethod
    def create(self, version: int) -> tuple[bytes, bytes | None]:
        """Material for a new KEK ``version``: ``(key, salt or None)``.

        Idempotent: asked again for a version it already made (a rotation
        killed half-way), it returns the same key.
        """

    def retire(self, versions: list[int]) -> str | None:
        """Forget old versions where the provider stores them; a note for the user."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """Where the key comes from, for messages."""


# -- file ---------------------------------------------------------------------
class FileKeyProvider(KeyProvider):
    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"key file {self.path}"

    def exists(self) -> bool:
        return self.path.exists()

    def _load(self) -> dict[int, bytes]:
        if not self.path.exists():
            raise KeyUnavailable(
                f"no key file at {self.path}: run `idvault init` to create a vault, or point "
                "IDVAULT_KEY_FILE (or --key-file) at the key file of this vault"
            )
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise KeyUnavailable(
                f"key file {self.path} is readable by other users (mode {mode:04o}); "
                f"run `chmod 600 {self.path}`"
            )
        # The parser's own words ("Expecting value: line 1 column 1") help nobody: say
        # what the file is not and what to do, and name a format only when it has one.
        not_ours = (f"key file {self.path} is not an idvault key file (corrupt, or another "
                    "kind of file); point IDVAULT_KEY_FILE (or --key-file) at this vault's "
                    "key file, or restore it from your backup")
        try:
            doc = json.loads(self.path.read_text())
        except ValueError:  # also UnicodeDecodeError: a binary file
            raise KeyUnavailable(not_ours) from None
        if not isinstance(doc, dict):
            raise KeyUnavailable(not_ours)
        if doc.get("format") != KEY_FILE_FORMAT:
            found = doc.get("format")
            raise KeyUnavailable(not_ours if found is None else
                                 f"{not_ours} (its format is {found!r}, expected "
                                 f"{KEY_FILE_FORMAT!r})")
        try:
            keys = {int(v): base64.b64decode(k, validate=True) for v, k in doc["keys"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise KeyUnavailable(not_ours) from None
        for version, key in keys.items():
            if len(key) != KEY_BYTES:
                raise KeyUnavailable(
                    f"key file {self.path}: version {version} is {len(key)} bytes, not {KEY_BYTES}"
                )
        return keys

    def _save(self, keys: Mapping[int, bytes]) -> None:
        doc = {
            "format": KEY_FILE_FORMAT,
            "keys": {str(v): base64.b64encode(k).decode() for v, k in sorted(keys.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".master.key.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def initialise(self) -> None:
        """Create the key file with version 1; refuse to overwrite one."""
        if self.path.exists():
            raise KeyUnavailable(f"key file {self.path} already exists; refusing to overwrite it")
        self._save({1: new_key()})

    def candidates(self, version: int, salt: bytes | None) -> list[bytes]:
        keys = self._load()
        if version not in keys:
            have = ", ".join(str(v) for v in sorted(keys)) or "none"
            raise KeyUnavailable(
                f"{self.describe()} has no KEK version {version} (it has: {have}); "
                "use the key file that belongs to this vault"
            )
        return [keys[version]]

    def create(self, version: int) -> tuple[bytes, None]:
        keys = self._load() if self.path.exists() else {}
        if version not in keys:
            keys[version] = new_key()
            self._save(keys)
        return keys[version], None

    def retire(self, versions: list[int]) -> str | None:
        keys = self._load()
        kept = {v: k for v, k in keys.items() if v not in versions}
        if kept != keys:
            self._save(kept)
        return None


# -- environment ----------------------------------------------------------------
class EnvKeyProvider(KeyProvider):
    name = "env"
    VAR = "IDVAULT_KEK"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def describe(self) -> str:
        return f"environment variable {self.VAR}"

    def _load(self) -> dict[int, bytes]:
        raw = self.environ.get(self.VAR, "").strip()
        if not raw:
            raise KeyUnavailable(
                f"{self.VAR} is not set; with IDVAULT_KEY_PROVIDER=env it must hold the KEK "
                "(base64 of 32 bytes; `idvault keys generate` prints one)"
            )
        keys: dict[int, bytes] = {}
        try:
            for entry in raw.split(","):
                version, _, b64 = entry.strip().rpartition(":")
                key = base64.b64decode(b64, validate=True)
                if len(key) != KEY_BYTES:
                    raise ValueError(f"a key is {len(key)} bytes, not {KEY_BYTES}")
                keys[int(version) if version else 1] = key
        except (ValueError, binascii.Error) as exc:
            raise KeyUnavailable(
                f"{self.VAR} is malformed ({exc}); expected base64 or 'VERSION:base64,...'"
            ) from None
        return keys

    def candidates(self, version: int, salt: bytes | None) -> list[bytes]:
        keys = self._load()
        if version not in keys:
            raise KeyUnavailable(f"{self.VAR} has no KEK version {version}")
        return [keys[version]]

    def create(self, version: int) -> tuple[bytes, None]:
        keys = self._load()
        if version not in keys:
            raise KeyUnavailable(
                f"to rotate with the env key provider, first add the new key as version "
                f"{version} to {self.VAR} (e.g. '{version}:<new base64>,<current entries>'); "
                "`idvault keys generate` prints a new key"
            )
        return keys[version], None

    def retire(self, versions: list[int]) -> str | None:
        listed = ", ".join(str(v) for v in versions)
        return f"KEK version(s) {listed} are no longer needed: remove them from {self.VAR}"


# -- passphrase -------------------------------------------------------------------
class PassphraseKeyProvider(KeyProvider):
    name = "passphrase"
    VAR = "IDVAULT_PASSPHRASE"
    NEW_VAR = "IDVAULT_NEW_PASSPHRASE"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def describe(self) -> str:
        return f"passphrase in {self.VAR}"

    @staticmethod
    def derive(passphrase: str, salt: bytes) -> bytes:
        return Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
            passphrase.encode()
        )

    def _passphrases(self) -> list[str]:
        found = [self.environ.get(v, "") for v in (self.VAR, self.NEW_VAR)]
        found = [p for p in found if p]
        if not found:
            raise KeyUnavailable(f"{self.VAR} is not set; the passphrase provider needs it")
        return found

    def candidates(self, version: int, salt: bytes | None) -> list[bytes]:
        if salt is None:
            raise KeyUnavailable(f"KEK version {version} has no scrypt salt in the key store")
        return [self.derive(p, salt) for p in self._passphrases()]

    def create(self, version: int) -> tuple[bytes, bytes]:
        passphrase = self.environ.get(self.NEW_VAR) if version > 1 else self.environ.get(self.VAR)
        if not passphrase:
            var = self.NEW_VAR if version > 1 else self.VAR
            raise KeyUnavailable(f"set {var} to the {'new ' if version > 1 else ''}passphrase")
        if len(passphrase) < 12:
            raise KeyUnavailable("the passphrase must be at least 12 characters long")
        salt = os.urandom(16)
        return self.derive(passphrase, salt), salt

    def retire(self, versions: list[int]) -> str | None:
        return f"the old passphrase is no longer needed: set {self.VAR} to the new one"


def provider_for(kind: str, key_file: Path) -> KeyProvider:
    if kind == "file":
        return FileKeyProvider(key_file)
    if kind == "env":
        return EnvKeyProvider()
    if kind == "passphrase":
        return PassphraseKeyProvider()
    raise KeyUnavailable(f"unknown key provider {kind!r}")
