"""Settings: where the vault keeps its data and keys, and its thresholds.

Every setting has an environment variable and a default, and the ones that
locate a vault also have a flag on every CLI command; ``Settings.from_env``
reads the environment and explicit overrides (flags) win over it. docs/configuration.md documents each field and a test keeps the two in
step, so add a field there when you add one here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import platformdirs

from vault.errors import InvalidInput

KEY_PROVIDERS = ("file", "env", "passphrase")


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("idvault", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Configuration of one vault; each field's environment variable is in its comment.

    The locations and the key provider also have CLI flags on every command.
    """

    data_dir: Path = field(default_factory=default_data_dir)  # IDVAULT_DATA_DIR
    database_url: str | None = None  # IDVAULT_DATABASE_URL; default sqlite in data_dir
    keystore_url: str | None = None  # IDVAULT_KEYSTORE_URL; default sqlite in data_dir
    key_provider: str = "file"  # IDVAULT_KEY_PROVIDER: file | env | passphrase
    key_file: Path | None = None  # IDVAULT_KEY_FILE; default data_dir/master.key
    # IDVAULT_KEK (env provider) and IDVAULT_PASSPHRASE (passphrase provider)
    # are read by the key provider itself and never stored in Settings.
    dedupe_block: float = 0.70  # IDVAULT_DEDUPE_BLOCK
    dedupe_review: float = 0.50  # IDVAULT_DEDUPE_REVIEW
    dedupe_index: str = "auto"  # IDVAULT_DEDUPE_INDEX: auto | flat
    max_artifact_bytes: int = 16 * 1024 * 1024  # IDVAULT_MAX_ARTIFACT_BYTES
    dek_cache_seconds: float = 30.0  # IDVAULT_DEK_CACHE_SECONDS; 0 disables
    # Scale-out: jobs go to Celery workers over this broker (redis://...); None runs them
    # on a thread of the server process (the embedded default).
    broker_url: str | None = None  # IDVAULT_BROKER_URL
    job_lease_seconds: float = 30.0  # IDVAULT_JOB_LEASE_SECONDS: a silent worker's jobs rerun

    def __post_init__(self) -> None:
        # Accept str paths from callers; store Paths (the dataclass is frozen).
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if self.key_file is not None:
            object.__setattr__(self, "key_file", Path(self.key_file).expanduser())
        if self.key_provider not in KEY_PROVIDERS:
            raise InvalidInput(
                f"unknown key provider {self.key_provider!r}; choose one of {', '.join(KEY_PROVIDERS)}"
            )
        if self.dedupe_index == "ivf":  # the former approximate index; auto replaced it
            object.__setattr__(self, "dedupe_index", "auto")
        if self.dedupe_index not in ("auto", "flat"):
            raise InvalidInput(f"dedupe index must be 'auto' or 'flat', not {self.dedupe_index!r}")
        if not 0.0 < self.dedupe_review <= self.dedupe_block <= 1.0:
            raise InvalidInput(
                "dedupe thresholds must satisfy 0 < review <= block <= 1 "
                f"(got review={self.dedupe_review}, block={self.dedupe_block})"
            )
        if self.max_artifact_bytes <= 0:
            raise InvalidInput("max_artifact_bytes must be positive")
        if not self.job_lease_seconds > 0:
            raise InvalidInput("job_lease_seconds must be positive")
        if self.broker_url is not None and not self.broker_url.startswith(
                ("redis://", "rediss://", "redis+socket://")):
            raise InvalidInput(f"the broker URL must be a Redis URL (redis://host:6379/0), "
                               f"not {redact_url(self.broker_url)!r}")

    # -- derived locations -------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'vault.db'}"

    @property
    def resolved_keystore_url(self) -> str:
        return self.keystore_url or f"sqlite:///{self.data_dir / 'keystore.db'}"

    @property
    def resolved_key_file(self) -> Path:
        return self.key_file or self.data_dir / "master.key"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``IDVAULT_*`` variables, then ``overrides`` (None = unset)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_VARS[f.name])
            if raw not in (None, ""):
                values[f.name] = _parse(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


ENV_VARS = {
    "data_dir": "IDVAULT_DATA_DIR",
    "database_url": "IDVAULT_DATABASE_URL",
    "keystore_url": "IDVAULT_KEYSTORE_URL",
    "key_provider": "IDVAULT_KEY_PROVIDER",
    "key_file": "IDVAULT_KEY_FILE",
    "dedupe_block": "IDVAULT_DEDUPE_BLOCK",
    "dedupe_review": "IDVAULT_DEDUPE_REVIEW",
    "dedupe_index": "IDVAULT_DEDUPE_INDEX",
    "max_artifact_bytes": "IDVAULT_MAX_ARTIFACT_BYTES",
    "dek_cache_seconds": "IDVAULT_DEK_CACHE_SECONDS",
    "broker_url": "IDVAULT_BROKER_URL",
    "job_lease_seconds": "IDVAULT_JOB_LEASE_SECONDS",
}


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _parse(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
    except ValueError:
        raise InvalidInput(f"{ENV_VARS[name]}={raw!r} is not a valid {kind}") from None
    return raw
