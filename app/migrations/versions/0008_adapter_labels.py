"""a classification adapter's label set on its version

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapter_versions", sa.Column("labels", sa.JSON(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not batch mode's copy of the table: finetune_jobs' foreign key
    # points at adapter_versions, and SQLite refuses to drop a referenced table that has rows.
    op.drop_column("adapter_versions", "labels")
