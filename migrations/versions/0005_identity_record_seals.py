"""Identity record seals (issue 17): each identity's handle, owner, status and consent
records, sealed under the key store's record key (``vault.record_seal``).

The column is added empty: existing rows are sealed once, with the operator's key, the
first time the vault is opened with its keys (``Vault.open``), which then records in the
key store that it was done.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seal', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.drop_column('seal')
