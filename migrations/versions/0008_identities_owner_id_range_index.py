"""An index on identities (owner_id, id) in place of the one on owner_id (issue 14).

An index rebuild reads an owner's identities by id range (vault.dedupe_load). With
only an index on owner_id, PostgreSQL planning without fresh statistics (after a
restore, or with autovacuum off) combined that index's every entry for the owner
with the range's, for every range: 100 ms a range of 1,000 at 1M identities instead
of 2. The new index answers owner-only lookups as the old one did.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 20:30:00
"""

from __future__ import annotations

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.create_index('ix_identities_owner_id_id', ['owner_id', 'id'], unique=False)
        batch_op.drop_index(batch_op.f('ix_identities_owner_id'))


def downgrade() -> None:
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_identities_owner_id'), ['owner_id'], unique=False)
        batch_op.drop_index('ix_identities_owner_id_id')
