"""a fine-tuning job's evaluation dataset: the dataset whose rows are its evaluation split (config
`evaluation_dataset`, OpenAI's `validation_file`)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

FOREIGN_KEY = "fk_finetune_jobs_evaluation_dataset_id_datasets"


def upgrade() -> None:
    # Jobs created before this have none: they evaluate on their dataset's own evaluation split, as they did.
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evaluation_dataset_id", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(FOREIGN_KEY, "datasets", ["evaluation_dataset_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_constraint(FOREIGN_KEY, type_="foreignkey")
        batch_op.drop_column("evaluation_dataset_id")
