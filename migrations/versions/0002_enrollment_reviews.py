"""Enrollment reviews: the reviews table and the identity status 'held'.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 19:09:38.724486
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reviews',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('identity_id', sa.Integer(), nullable=True),
    sa.Column('candidate_id', sa.Integer(), nullable=True),
    sa.Column('handle', sa.String(length=80), nullable=False),
    sa.Column('candidate_handle', sa.String(length=80), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decided_by', sa.String(length=128), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'accepted', 'rejected')", name=op.f('ck_reviews_status')),
    sa.ForeignKeyConstraint(['candidate_id'], ['identities.id'], name=op.f('fk_reviews_candidate_id_identities'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['identity_id'], ['identities.id'], name=op.f('fk_reviews_identity_id_identities'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['owner_id'], ['owners.id'], name=op.f('fk_reviews_owner_id_owners'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reviews'))
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reviews_identity_id'), ['identity_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reviews_owner_id'), ['owner_id'], unique=False)

    # SQLite cannot alter a CHECK constraint: batch mode rebuilds the table.
    with op.batch_alter_table('identities') as batch_op:
        batch_op.drop_constraint(op.f('ck_identities_status'), type_='check')
        batch_op.create_check_constraint(op.f('ck_identities_status'), "status IN ('active', 'held', 'withdrawn')")



def downgrade() -> None:
    with op.batch_alter_table('identities') as batch_op:
        batch_op.drop_constraint(op.f('ck_identities_status'), type_='check')
        batch_op.create_check_constraint(op.f('ck_identities_status'), "status IN ('active', 'withdrawn')")
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reviews_owner_id'))
        batch_op.drop_index(batch_op.f('ix_reviews_identity_id'))

    op.drop_table('reviews')
