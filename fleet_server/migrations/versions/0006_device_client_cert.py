"""device TLS client certificate serial (revoked through the CRL at decommission)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 01:05:00
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_cert_serial', sqlmodel.sql.sqltypes.AutoString(length=64),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_column('client_cert_serial')
