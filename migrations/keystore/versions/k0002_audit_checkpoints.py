"""Audit checkpoints (issue 17): signed (seq, head hash) pairs kept apart from the data
database.

A key store that already belongs to a vault gets the ``audit_anchor_pending`` marker: the
migration cannot sign (it has no KEK), so the vault's next open with its keys anchors the
head as it then is and removes the marker (vault.audit_anchor). Without the marker, a key
store with no checkpoint means they were deleted.

Revision ID: k0002
Revises: k0001
Create Date: 2026-12-06 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'k0002'
down_revision = 'k0001'
branch_labels = None
depends_on = None

_META = sa.table("keystore_meta", sa.column("key", sa.String), sa.column("value", sa.String))


def upgrade() -> None:
    op.create_table('audit_checkpoints',
    sa.Column('slot', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('signature', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('slot', name=op.f('pk_audit_checkpoints'))
    )
    conn = op.get_bind()
    has_vault = conn.execute(sa.select(_META.c.key).where(_META.c.key == "vault_id")).first()
    if has_vault is not None:
        op.execute(_META.insert().values(key="audit_anchor_pending", value="k0002"))


def downgrade() -> None:
    op.execute(_META.delete().where(_META.c.key == "audit_anchor_pending"))
    op.drop_table('audit_checkpoints')
