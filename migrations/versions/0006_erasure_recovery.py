"""Erasure recovery (issue 17): the 'erasing' status and the table of signed erasure receipts.

An erasure first marks its identity ``erasing`` (indexed, so opening the vault finds
the ones a crash left unfinished with one query) and records the request in
``erasure_receipts``; the transaction that deletes the identity's rows stores the
signed receipt there, so a completed erasure always has one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('erasure_receipts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('identity_uid', sa.String(length=36), nullable=False),
    sa.Column('handle', sa.String(length=80), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('data_key_id', sa.String(length=36), nullable=True),
    sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('receipt', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_erasure_receipts')),
    sa.UniqueConstraint('identity_uid', name=op.f('uq_erasure_receipts_identity_uid'))
    )
    with op.batch_alter_table('erasure_receipts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_erasure_receipts_handle'), ['handle'], unique=False)

    # SQLite cannot alter a CHECK constraint: batch mode rebuilds the table.
    with op.batch_alter_table('identities') as batch_op:
        batch_op.drop_constraint(op.f('ck_identities_status'), type_='check')
        batch_op.create_check_constraint(
            op.f('ck_identities_status'), "status IN ('active', 'held', 'withdrawn', 'erasing')")
        batch_op.create_index(batch_op.f('ix_identities_status'), ['status'], unique=False)


def downgrade() -> None:
    # The old schema has no 'erasing': 'withdrawn' is the old status that refuses every use.
    op.execute("UPDATE identities SET status = 'withdrawn' WHERE status = 'erasing'")
    with op.batch_alter_table('identities') as batch_op:
        batch_op.drop_index(batch_op.f('ix_identities_status'))
        batch_op.drop_constraint(op.f('ck_identities_status'), type_='check')
        batch_op.create_check_constraint(
            op.f('ck_identities_status'), "status IN ('active', 'held', 'withdrawn')")
    with op.batch_alter_table('erasure_receipts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_erasure_receipts_handle'))
    op.drop_table('erasure_receipts')
