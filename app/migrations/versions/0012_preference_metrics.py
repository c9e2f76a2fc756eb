"""preference tuning's metrics on a job's metrics rows: the chosen and rejected answers' implicit rewards, their
margin and the share of rows where chosen wins (method "dpo")

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COLUMNS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


def upgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
