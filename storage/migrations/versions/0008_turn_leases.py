"""Web replicas sharing one database answer one turn of a user at a time: the replica answering it
holds a lease on the user's turn (turn_leases), renewed while the reply runs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('turn_leases',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('holder', sa.String(length=64), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_turn_leases_user_id_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_turn_leases')),
    sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table('turn_leases')
