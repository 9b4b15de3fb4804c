"""Audit rows keep the names of who acted and on whom: an account's deletion sets its ids to NULL,
and its name is then all that tells the admins who it was.

Rows written before this revision get the names of the users that still exist.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

USERNAME_COLUMN_CHARS = 64  # storage.settings.USERNAME_COLUMN_CHARS when this revision was written


def upgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor_name', sa.String(length=USERNAME_COLUMN_CHARS), nullable=True))
        batch_op.add_column(sa.Column('target_name', sa.String(length=USERNAME_COLUMN_CHARS), nullable=True))
    op.execute("UPDATE audit_log SET actor_name = (SELECT username FROM users WHERE users.id = audit_log.actor_id)")
    op.execute("UPDATE audit_log SET target_name = "
               "(SELECT username FROM users WHERE users.id = audit_log.target_user_id)")


def downgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_column('target_name')
        batch_op.drop_column('actor_name')
