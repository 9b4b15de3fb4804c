"""Adapter snapshots' bytes may be kept in the database (StorageSettings.snapshot_store "database"),
so that web replicas and workers on several machines share them without a shared folder. Existing
snapshots stay in their files: a row's path tells where its bytes are.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('snapshot_blobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_snapshot_blobs_user_id_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_snapshot_blobs')),
    sa.UniqueConstraint('user_id', 'sha256', name=op.f('uq_snapshot_blobs_user_id_sha256')),
    sqlite_autoincrement=True,
    )


def downgrade() -> None:
    """Snapshots kept in the database are lost: their users' adapters are rebuilt from the history."""
    op.drop_table('snapshot_blobs')
