"""Alembic environment of the key store database."""

from migrations._env_common import run
from vault.keystore_models import KeystoreBase

run(KeystoreBase.metadata)
