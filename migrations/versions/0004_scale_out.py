"""Scale-out: the dedupe change log (ordered adds and removes of each owner's indexed
faces) and when each job was last sent to the workers.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 09:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dedupe_changes',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
              nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('identity_id', sa.Integer(), nullable=False),
    sa.Column('op', sa.String(length=8), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("op IN ('add', 'remove')", name=op.f('ck_dedupe_changes_op')),
    sa.ForeignKeyConstraint(['owner_id'], ['owners.id'],
                            name=op.f('fk_dedupe_changes_owner_id_owners'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_dedupe_changes'))
    )
    with op.batch_alter_table('dedupe_changes', schema=None) as batch_op:
        batch_op.create_index('ix_dedupe_changes_owner_seq', ['owner_id', 'seq'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('dispatched_at')
    with op.batch_alter_table('dedupe_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_dedupe_changes_owner_seq')
    op.drop_table('dedupe_changes')
