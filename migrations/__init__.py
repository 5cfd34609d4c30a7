"""Alembic migration chains: ``migrations/`` for the data database and
``migrations/keystore/`` for the key store. Run through ``vault.db.upgrade``
(``idvault init`` and every start) so users never call Alembic themselves."""
