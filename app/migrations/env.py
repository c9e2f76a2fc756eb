"""Alembic environment: the caller (app.db.migrate) hands over an open connection."""

from alembic import context

import app.event_tables  # noqa: F401 - its tables join Base.metadata
from app.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` CLI use: build one from settings
    from app.db import get_engine

    connection = get_engine().connect()

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
