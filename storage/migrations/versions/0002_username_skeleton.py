"""Username skeletons: a unique column of what each name looks like, so that look-alikes are refused.

Existing rows are filled in oldest first. An account whose name already looks like an older
account's keeps NULL there (the unique index allows any number of NULLs): it goes on working, and
the older account's skeleton keeps further look-alikes out.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# The function sign-up uses, so that old and new rows compare alike. Should it ever change (new
# confusables data), a later migration recomputes the column.
from storage.validation import username_skeleton

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SKELETON_CHARS = 512


def upgrade() -> None:
    """Add users.username_skeleton, fill it in, then make it unique."""
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('username_skeleton', sa.String(length=SKELETON_CHARS), nullable=True))
    _fill_in_skeletons()
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_users_username_skeleton'), ['username_skeleton'], unique=True)


def downgrade() -> None:
    """Drop the column (and its index); nothing else depended on it."""
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_users_username_skeleton'))
        batch_op.drop_column('username_skeleton')


def _fill_in_skeletons() -> None:
    users = sa.table('users', sa.column('id', sa.Integer()), sa.column('username', sa.String()),
                     sa.column('username_skeleton', sa.String()))
    connection = op.get_bind()
    taken: set[str] = set()
    rows = []
    for user_id, name in connection.execute(sa.select(users.c.id, users.c.username).order_by(users.c.id)):
        skeleton = username_skeleton(name)
        if skeleton in taken or len(skeleton) > SKELETON_CHARS:
            continue  # stays NULL: see the module docstring
        taken.add(skeleton)
        rows.append({'user_id': user_id, 'skeleton': skeleton})
    if rows:
        connection.execute(users.update().where(users.c.id == sa.bindparam('user_id'))
                           .values(username_skeleton=sa.bindparam('skeleton')), rows)
