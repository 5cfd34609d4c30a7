"""Audit checkpoints (issue 17): signed (seq, head hash) pairs kept apart from the data
database.

Revision ID: k0002
Revises: k0001
Create Date: 2026-12-06 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = 'k0002'
down_revision = 'k0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
