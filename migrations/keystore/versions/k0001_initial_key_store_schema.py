"""initial key store schema

Revision ID: k0001
Revises: 
Create Date: 2026-11-21 18:56:52.044920
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'k0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('data_keys',
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('identity_uid', sa.String(length=36), nullable=False),
    sa.Column('kek_version', sa.Integer(), nullable=False),
    sa.Column('wrapped', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key_id', name=op.f('pk_data_keys')),
    sa.UniqueConstraint('identity_uid', name=op.f('uq_data_keys_identity_uid'))
    )
    with op.batch_alter_table('data_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_data_keys_kek_version'), ['kek_version'], unique=False)

    op.create_table('kek_versions',
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('salt', sa.LargeBinary(), nullable=True),
    sa.Column('check_value', sa.LargeBinary(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('active', 'retiring', 'retired')", name=op.f('ck_kek_versions_state')),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_kek_versions'))
    )
    op.create_table('keystore_meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_keystore_meta'))
    )
    op.create_table('signing_keys',
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('public_key', sa.LargeBinary(), nullable=False),
    sa.Column('kek_version', sa.Integer(), nullable=False),
    sa.Column('wrapped_private', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key_id', name=op.f('pk_signing_keys')),
    sa.UniqueConstraint('purpose', name=op.f('uq_signing_keys_purpose'))
    )
    with op.batch_alter_table('signing_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signing_keys_kek_version'), ['kek_version'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('signing_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signing_keys_kek_version'))

    op.drop_table('signing_keys')
    op.drop_table('keystore_meta')
    op.drop_table('kek_versions')
    with op.batch_alter_table('data_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_data_keys_kek_version'))

    op.drop_table('data_keys')
