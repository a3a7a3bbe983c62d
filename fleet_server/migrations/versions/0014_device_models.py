"""several named models per device: what each of a device's models runs, from its state reports

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 00:00:00
"""

import re
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as fleet_server.labels, frozen for this migration


def upgrade() -> None:
    table = op.create_table('device_model',
                            sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
                            sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
                            sa.Column('active_version', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
                            sa.Column('active_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
                            sa.Column('active_slot', sqlmodel.sql.sqltypes.AutoString(length=1), nullable=True),
                            sa.Column('update_state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
                            sa.Column('job', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
                            sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
                            sa.ForeignKeyConstraint(['device_id'], ['device.id']),
                            sa.PrimaryKeyConstraint('device_id', 'model'))
    op.create_index('ix_device_model_version', 'device_model', ['active_version'], unique=False)
    _backfill(table)


def _backfill(table) -> None:
    """Every device that runs a model gets its row now, named by its label's first word (what an agent with one model
    reports): devices send their state again only when they reconnect or update, and until then the device list's
    version filter and the per-model delta base read these rows."""
    device = sa.table('device', sa.column('id', sa.String), sa.column('active_version', sa.String),
                      sa.column('active_sha256', sa.String))
    rows, now = [], datetime.now(UTC)
    for device_id, label, sha in op.get_bind().execute(
            sa.select(device.c.id, device.c.active_version, device.c.active_sha256)
            .where(device.c.active_sha256.is_not(None), device.c.active_version.is_not(None))):
        name = label.split(' ', 1)[0]
        if MODEL_NAME.match(name):
            rows.append({'device_id': device_id, 'model': name, 'active_version': label, 'active_sha256': sha,
                         'active_slot': None, 'update_state': 'idle', 'job': None, 'updated_at': now})
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    op.drop_index('ix_device_model_version', table_name='device_model')
    op.drop_table('device_model')
