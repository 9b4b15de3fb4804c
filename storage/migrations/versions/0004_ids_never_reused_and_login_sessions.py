"""Ids are never reused, and each browser login is a row of its own.

On SQLite, every table but messages (which already had it) is rebuilt with AUTOINCREMENT: plain
SQLite hands the largest rowid out again once its row is deleted, so a deleted account's open page
became the next account made. The rebuild copies the rows and SQLite's sequence starts after the
largest id copied. PostgreSQL's sequences never reuse a value: nothing to do there.

login_sessions holds one row per browser login (only its secret's SHA-256); the page is checked
against it at every action, and the row goes at logout and with its account.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

REBUILT = ('users', 'conversations', 'adapter_snapshots', 'compression_jobs', 'api_keys', 'audit_log')


def upgrade() -> None:
    """Rebuild the SQLite tables with AUTOINCREMENT; create login_sessions (empty: everyone logs in again)."""
    if op.get_context().dialect.name == 'sqlite':
        for table in REBUILT:
            _rebuild(table, autoincrement=True)
    op.create_table('login_sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_login_sessions_user_id_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_login_sessions')),
    sa.UniqueConstraint('secret_hash', name=op.f('uq_login_sessions_secret_hash')),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('login_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_login_sessions_user_id'), ['user_id'], unique=False)


def downgrade() -> None:
    """Drop login_sessions (every page must log in again); the tables go back to plain rowids."""
    with op.batch_alter_table('login_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_login_sessions_user_id'))
    op.drop_table('login_sessions')
    if op.get_context().dialect.name == 'sqlite':
        for table in REBUILT:
            _rebuild(table, autoincrement=False)


def _rebuild(table: str, *, autoincrement: bool) -> None:
    """Copy the table into a new one with or without AUTOINCREMENT (batch mode keeps its columns,
    constraints and indexes, the partial unique index of compression_jobs included)."""
    with op.batch_alter_table(table, recreate='always', table_kwargs={'sqlite_autoincrement': autoincrement}):
        pass
