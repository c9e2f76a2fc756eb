"""reinforcement fine-tuning's metrics on a job's metrics rows (method "grpo"): the total reward's mean and spread,
the KL to the reference, the completions' mean length, each reward's statistics and failures, sample completions

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

NUMBERS = ("reward", "reward_std", "kl", "completion_length")
DOCUMENTS = ("rewards", "samples")


def upgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in NUMBERS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
        for name in DOCUMENTS:
            batch_op.add_column(sa.Column(name, sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in reversed(NUMBERS + DOCUMENTS):
            batch_op.drop_column(name)
