"""server replicas register their broker sessions (an orphaned one is drained and retired by the engine's holder)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 19:30:00
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'server_replica',
        sa.Column('client_id', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('username', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('heartbeat_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('client_id'),
    )


def downgrade() -> None:
    op.drop_table('server_replica')
