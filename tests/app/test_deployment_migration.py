"""Migration 0005 (deployments and their transitions) downgrades and upgrades cleanly, on SQLite and PostgreSQL."""

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from app.db import MIGRATIONS_DIR, get_engine, session_scope
from app.models import Deployment, DeploymentTransition
from conftest import Platform, make_tenant


def _alembic(revision: str, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with get_engine().begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def tables() -> set[str]:
    return set(inspect(get_engine()).get_table_names())


def test_0005_down_and_up(platform: Platform) -> None:
    tenant_id = make_tenant("alice")[0]
    assert {"deployments", "deployment_transitions"} <= tables()
    _alembic("0004", down=True)
    assert not {"deployments", "deployment_transitions"} & tables()
    _alembic("head")
    with session_scope() as s:
        d = Deployment(
            tenant_id=tenant_id,
            name="d",
            base_model="m",
            accelerator="cpu",
            engine="native",
            min_replicas=0,
            max_replicas=1,
            scale_up_threshold=1,
            cooldown_time=60.0,
            preloaded_adapters=[],
        )
        s.add(d)
        s.flush()
        s.add(DeploymentTransition(deployment_id=d.id, to_status="Pending", reason="created"))
    with session_scope() as s:
        [row] = s.query(Deployment).all()
        assert (row.status, row.target_state, row.config_version, row.transitions[0].to_status) == (
            "Pending",
            "active",
            1,
            "Pending",
        )
