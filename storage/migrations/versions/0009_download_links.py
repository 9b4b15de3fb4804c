"""Download links live in the database, so that a link made on one web replica is served by any
other: download_links, and users.downloads_revision to refuse an export its owner's logout,
deletion or forgetting overtook on another replica. Links of the process that ran before the
upgrade were in its memory only: none is carried over.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('downloads_revision', sa.Integer(), server_default='0', nullable=False))
    op.create_table('download_links',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('subject_id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=True),
    sa.Column('filename', sa.String(length=200), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_download_links_owner_id_users'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subject_id'], ['users.id'], name=op.f('fk_download_links_subject_id_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_download_links')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_download_links_token_hash')),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('download_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_download_links_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_download_links_subject_id'), ['subject_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('download_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_download_links_subject_id'))
        batch_op.drop_index(batch_op.f('ix_download_links_owner_id'))
    op.drop_table('download_links')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('downloads_revision')
