"""an index for the device list's default filter and order

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 22:05:00
"""

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_device_live_id', 'device', ['decommissioned_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_device_live_id', table_name='device')
