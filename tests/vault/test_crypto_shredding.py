"""Crypto-shredding: a copy of the data database taken before an erasure cannot be
decrypted afterwards with the live key store (SQLite file copy; PostgreSQL
database copy via CREATE DATABASE ... TEMPLATE)."""

import shutil

import pytest

from tests.helpers import consent, face_payload
from vault.config import Settings
from vault.errors import IntegrityError
from vault.vault import Vault


def _backup(vault: Vault, settings: Settings, pg_databases=None) -> str:
    """Copy the data database; the URL of the copy."""
    if settings.database_url is None:
        copy = settings.data_dir / "backup.db"
        vault._checkpoint()  # fold the WAL in, so the file copy is complete
        shutil.copy(settings.data_dir / "vault.db", copy)
        return f"sqlite:///{copy}"
    import psycopg

    from tests.conftest import PG_ADMIN

    source = vault.engine.url.database
    vault.engine.dispose()  # TEMPLATE needs the source without connections
    target = f"{source}_backup"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')
    pg_databases.created.append(target)
    return settings.database_url.rsplit("/", 1)[0] + "/" + target


def test_backup_taken_before_erasure_is_unreadable_after(family, settings, request):
    pg = request.getfixturevalue("pg_databases") if settings.database_url else None
    for name in ("ana", "ben"):
        family.create_identity(f"smiths/{name}", consent())
        family.put_artifact(f"smiths/{name}", "face", face_payload(seed=len(name)))
    backup_url = _backup(family, settings, pg)
    # Before the erasure the backup is fully readable with the live key store.
    with Vault.open(settings.with_(database_url=backup_url)) as restored:
        assert restored.get_artifact("smiths/ana", "face").artifact.kind == "face"
    family.delete_identity("smiths/ana")
    with Vault.open(settings.with_(database_url=backup_url)) as restored:
        restored.keys._deks.clear()
        with pytest.raises(IntegrityError, match="data key is gone"):
            restored.get_artifact("smiths/ana", "face")
        # The rest of the backup is intact: only the erased identity is shredded.
        assert restored.get_artifact("smiths/ben", "face").artifact.kind == "face"
