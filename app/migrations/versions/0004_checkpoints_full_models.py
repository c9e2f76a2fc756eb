"""checkpoints, full-model versions, version numbers taken by jobs, classification metrics

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("repos", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_version", sa.Integer(), nullable=False, server_default="0"))
    # The counter starts where the versions published so far end.
    op.execute(
        "UPDATE repos SET last_version = "
        "COALESCE((SELECT MAX(v.version) FROM adapter_versions v WHERE v.repo_id = repos.id), 0)"
    )
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=10), nullable=False, server_default="lora"))
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE finetune_jobs SET version = "
        "(SELECT v.version FROM adapter_versions v WHERE v.id = finetune_jobs.adapter_version_id) "
        "WHERE adapter_version_id IS NOT NULL"
    )
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("classification", sa.JSON(), nullable=True))

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("repo_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("base_model", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["finetune_jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["repo_id"], ["repos.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("repo_id", "version", "number"),
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoints_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_checkpoints_repo_id"), ["repo_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_repo_id"))
        batch_op.drop_index(batch_op.f("ix_checkpoints_job_id"))
    op.drop_table("checkpoints")
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+) rather than batch mode's copy of the table: other tables'
    # foreign keys point at these, and SQLite refuses to drop a referenced table that has rows.
    for table, column in (
        ("job_metrics", "classification"),
        ("finetune_jobs", "version"),
        ("adapter_versions", "kind"),
        ("repos", "last_version"),
    ):
        with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
            batch_op.drop_column(column)
