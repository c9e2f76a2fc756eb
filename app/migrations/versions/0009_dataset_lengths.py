"""Each training row's (prompt, completion) token lengths on the dataset, for a fine-tuning job's "auto" values and
its truncation report (functions/auto_config.py).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Datasets validated before this have none: the first job created on one counts them once.
    op.add_column("datasets", sa.Column("train_lengths", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("datasets", "train_lengths")
