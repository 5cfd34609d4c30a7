"""The Alembic chains create exactly the schema the models declare."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from vault import db
from vault.keystore_models import KeystoreBase
from vault.models import Base


@pytest.mark.parametrize("schema, metadata", [("data", Base.metadata),
                                              ("keystore", KeystoreBase.metadata)])
def test_migrated_schema_equals_models(vault, schema, metadata):
    engine = vault.engine if schema == "data" else vault.keystore_engine
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        diff = compare_metadata(ctx, metadata)
    assert diff == []
    assert db.current_revision(engine) == db.head_revision(schema)


def test_open_upgrades_idempotently(vault, settings):
    from vault.vault import Vault

    vault.dispose()
    with Vault.open(settings) as again:  # runs `upgrade head` on an up-to-date DB
        assert again.vault_id == vault.vault_id


def test_upgrade_from_first_revision_keeps_data(family, settings):
    """An existing vault at revision 0001 upgrades in place without losing a row."""
    from tests.helpers import consent, face_payload
    from vault.vault import Vault

    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload())
    db.downgrade(family.engine, "data", "0001")
    assert db.current_revision(family.engine) == "0001"
    # a vault made before record seals (0005) has no key-store marker saying it sealed them
    with family.keystore_engine.begin() as c:
        c.execute(text("DELETE FROM keystore_meta WHERE key = 'records_sealed_at'"))
    family.dispose()
    with Vault.open(settings) as v:
        assert db.current_revision(v.engine) == db.head_revision("data")
        assert v.get_artifact("smiths/ana", "face").artifact.shapes["normed"] == [2, 512]
        assert v.describe("smiths/ana")["consent"]["subject"] == "Ana Smith"
        assert v.verify_audit().ok
