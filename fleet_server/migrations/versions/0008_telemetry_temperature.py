"""telemetry windows keep the device's temperature

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 05:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('telemetry_window', schema=None) as batch_op:
        batch_op.add_column(sa.Column('temperature_c', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('telemetry_window', schema=None) as batch_op:
        batch_op.drop_column('temperature_c')
