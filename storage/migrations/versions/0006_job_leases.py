"""Compression jobs get a lease: a running job is its worker's until `lease_until`, renewed while it
runs; a job whose worker died is taken over by another worker once the lease has run out.

Jobs running when this revision is applied get no lease: the next claim takes them over at once
(they were a stopped process's, as the start of a single process already assumed).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('compression_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('compression_jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
