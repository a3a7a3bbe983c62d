"""maintenance windows of device tags

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 00:00:00
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tag_windows',
                    sa.Column('tag', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
                    sa.Column('windows', sa.JSON(), nullable=False),
                    sa.Column('updated_by', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
                    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
                    sa.PrimaryKeyConstraint('tag'))


def downgrade() -> None:
    op.drop_table('tag_windows')
