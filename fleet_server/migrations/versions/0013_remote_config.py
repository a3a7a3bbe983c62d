"""remote configuration: desired settings per device or tag, and what each device was sent and reported

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 00:00:00
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('desired_config',
                    sa.Column('scope', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
                    sa.Column('settings', sa.JSON(), nullable=False),
                    sa.Column('updated_by', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
                    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
                    sa.PrimaryKeyConstraint('scope'))
    op.create_table('device_config',
                    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
                    sa.Column('desired_version', sa.BigInteger(), nullable=False),
                    sa.Column('desired', sa.JSON(), nullable=False),
                    sa.Column('sent_at', sa.Float(), nullable=True),
                    sa.Column('reported_version', sa.BigInteger(), nullable=False),
                    sa.Column('applied', sa.JSON(), nullable=False),
                    sa.Column('refused', sa.JSON(), nullable=False),
                    sa.Column('reported_at', sa.Float(), nullable=True),
                    sa.ForeignKeyConstraint(['device_id'], ['device.id']),
                    sa.PrimaryKeyConstraint('device_id'))


def downgrade() -> None:
    op.drop_table('device_config')
    op.drop_table('desired_config')
