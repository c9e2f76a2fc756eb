"""Migration 0004 on a database holding rows from before it (SQLite and PostgreSQL): the repos' version counters
and the jobs' version numbers are filled in from what was published, and it downgrades cleanly."""

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from app.db import MIGRATIONS_DIR, get_engine, session_scope
from app.models import Repo
from conftest import Platform, make_tenant
from functions.repos import allocate_version


def _alembic(revision: str, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with get_engine().begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def test_0004_fills_version_counters_from_published_versions(platform: Platform) -> None:
    tenant_id = make_tenant("alice")[0]
    _alembic("0003", down=True)
    now = "2026-01-01 00:00:00"
    rows = [
        "INSERT INTO repos (id, tenant_id, name, description, created_at) VALUES "
        f"('repo_a', '{tenant_id}', 'a', '', '{now}'), ('repo_b', '{tenant_id}', 'b', '', '{now}')",
        "INSERT INTO adapter_versions (id, repo_id, version, base_model, adapter_type, rank, target_modules, "
        f"created_at) VALUES ('ad_1', 'repo_a', 1, 'm', 'lora', 4, '[]', '{now}'), "
        f"('ad_3', 'repo_a', 3, 'm', 'lora', 4, '[]', '{now}')",
        "INSERT INTO datasets (id, tenant_id, name, base_model, file_format, size_bytes, status, errors, stats, "
        f"created_at, updated_at) VALUES ('ds_1', '{tenant_id}', 'd', 'm', 'jsonl', 1, 'ready', '[]', '{{}}', "
        f"'{now}', '{now}')",
        "INSERT INTO finetune_jobs (id, tenant_id, dataset_id, repo_id, base_model, config, status, "
        "estimated_tokens, estimate_micro_usd, attempts, adapter_version_id, created_at) VALUES "
        f"('ft_done', '{tenant_id}', 'ds_1', 'repo_a', 'm', '{{}}', 'completed', 0, 0, 1, 'ad_3', '{now}'), "
        f"('ft_queued', '{tenant_id}', 'ds_1', 'repo_b', 'm', '{{}}', 'queued', 0, 0, 0, NULL, '{now}')",
    ]
    with get_engine().begin() as conn:
        for statement in rows:
            conn.execute(text(statement))
    _alembic("head")

    with get_engine().connect() as conn:
        counters = dict(conn.execute(text("SELECT name, last_version FROM repos ORDER BY name")).all())
        versions = dict(conn.execute(text("SELECT id, version FROM finetune_jobs")).all())
        kinds = set(conn.scalars(text("SELECT kind FROM adapter_versions")))
    assert counters == {"a": 3, "b": 0}
    assert versions == {"ft_done": 3, "ft_queued": None}
    assert kinds == {"lora"}
    with session_scope() as s:  # the next number follows the published ones
        assert allocate_version(s, "repo_a") == 4 and allocate_version(s, "repo_b") == 1
        assert s.get_one(Repo, "repo_a").last_version == 4

    _alembic("0003", down=True)  # and back, leaving the rows of before
    with get_engine().connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM adapter_versions")) == 2
    _alembic("head")
