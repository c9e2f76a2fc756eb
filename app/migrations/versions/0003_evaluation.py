"""evaluation metrics and job summaries

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=10), nullable=False, server_default="train"))
        for name in ("perplexity", "token_accuracy", "sequence_accuracy", "char_error_rate"):
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("summary", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("summary")
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        for name in ("char_error_rate", "sequence_accuracy", "token_accuracy", "perplexity", "kind"):
            batch_op.drop_column(name)
