"""control plane shared by every API process: the runtime lease, load reports, health figures, rate log,
shared engines

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cold_starts", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapters", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("served", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "control_leases",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("holder", sa.String(length=100), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "load_reports",
        sa.Column("process", sa.String(length=100), nullable=False),
        sa.Column("deployment_id", sa.String(length=32), nullable=False),
        sa.Column("waiting", sa.Integer(), nullable=False),
        sa.Column("in_flight", sa.JSON(), nullable=False),
        sa.Column("adapters", sa.JSON(), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("process", "deployment_id"),
    )
    op.create_table(
        "deployment_points",
        sa.Column("deployment_id", sa.String(length=32), nullable=False),
        sa.Column("adapter", sa.String(length=200), nullable=False),
        sa.Column("period", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("inference_ms", sa.Float(), nullable=False),
        sa.Column("queue_ms", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("replicas_sum", sa.Float(), nullable=False),
        sa.Column("busy_sum", sa.Float(), nullable=False),
        sa.Column("cpu_samples", sa.Integer(), nullable=False),
        sa.Column("cpu_sum", sa.Float(), nullable=False),
        sa.Column("replica_seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("deployment_id", "adapter", "period"),
    )
    op.create_table(
        "deployment_latency",
        sa.Column("deployment_id", sa.String(length=32), nullable=False),
        sa.Column("adapter", sa.String(length=200), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("deployment_id", "adapter", "bucket"),
    )
    op.create_table(
        "shared_engines",
        sa.Column("host", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=500), nullable=False),
        sa.Column("base_model", sa.String(length=100), nullable=False),
        sa.Column("url", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=100), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("host", "key"),
    )
    op.create_table(
        "rate_log",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "at"),
    )


def downgrade() -> None:
    tables = ("rate_log", "shared_engines", "deployment_latency", "deployment_points", "load_reports")
    for table in (*tables, "control_leases"):
        op.drop_table(table)
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.drop_column("served")
        batch_op.drop_column("adapters")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("cold_starts")
