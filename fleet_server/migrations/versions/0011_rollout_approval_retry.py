"""rollout controls: the stage an operator approved, and the rollout a retry repeats for its failed devices

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.add_column(sa.Column('approved_stage', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('retry_of', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_rollout_retry_of', 'rollout', ['retry_of'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.drop_constraint('fk_rollout_retry_of', type_='foreignkey')
        batch_op.drop_column('retry_of')
        batch_op.drop_column('approved_stage')
