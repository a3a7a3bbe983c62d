"""conversion jobs on a job queue: per-profile parts, registered workers, and a cancelled job status

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 23:50:00
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None



def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("ALTER TYPE jobstatus ADD VALUE IF NOT EXISTS 'CANCELLED'")
    op.create_table(
        'conversion_part',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('profile', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('status', _status(), nullable=False),
        sa.Column('queue_job_id', sa.Integer(), nullable=True),
        sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('error', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['conversion_job.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'profile'),
    )
    with op.batch_alter_table('conversion_part', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversion_part_job_id'), ['job_id'], unique=False)
    op.create_table(
        'conversion_worker',
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('formats', sa.JSON(), nullable=False),
        sa.Column('flags', sa.JSON(), nullable=False),
        sa.Column('profiles', sa.JSON(), nullable=False),
        sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', sa.Float(), nullable=False),
        sa.Column('current', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def _status() -> sa.types.TypeEngine:
    values = ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')
    if op.get_bind().dialect.name == 'postgresql':  # the type exists (conversion_job.status): reuse it
        return postgresql.ENUM(*values, name='jobstatus', create_type=False)
    return sa.Enum(*values, name='jobstatus')


def downgrade() -> None:
    op.drop_table('conversion_worker')
    with op.batch_alter_table('conversion_part', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversion_part_job_id'))
    op.drop_table('conversion_part')
    # PostgreSQL cannot drop a value from an enum type: 'CANCELLED' stays in jobstatus (harmless to 0009's code).
