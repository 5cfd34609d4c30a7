"""Alembic environment of the data database."""

from migrations._env_common import run
from vault.models import Base

run(Base.metadata)
