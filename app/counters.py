"""Counters that many processes add to at once: one row per key, created by the first addition, and every
addition one atomic `INSERT ... ON CONFLICT (key) DO UPDATE SET x = x + n` (SQLite and PostgreSQL alike), so no
read-modify-write can lose another process's count."""

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session


def add(session: Session, model: type[DeclarativeBase], key: dict[str, Any], amounts: dict[str, Any]) -> Any:
    """Add `amounts` (column -> number) to the row of `model` named by `key` (its primary-key columns), creating
    it with them. Returns the row's new values of the amounts' columns (a Row), read in the same statement."""
    table: Table = model.__table__  # type: ignore[assignment]  # declarative models are built on Tables
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table).values(**key, **amounts)  # other columns: their defaults
    statement = statement.on_conflict_do_update(
        index_elements=list(key), set_={column: table.c[column] + value for column, value in amounts.items()}
    )
    return session.execute(statement.returning(*(table.c[column] for column in amounts))).one()
