"""`loraplex modal-check` says what a Modal set-up lacks, and exits 1 if anything is missing.

Modal's cloud cannot be reached from here (no account, no network), so its lookups (the secret's keys, the volume)
are a stand-in handed to the check (`ModalLookups`); the database check is real: it connects to the tests'
PostgreSQL (and refuses their SQLite, which Modal's containers could not share) and reads the migration revision.
"""

from collections.abc import Iterator, Sequence

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from app import cli, cli_modal
from app.cli_modal import Missing, check
from app.db import get_engine
from app.settings import get_settings
from conftest import Platform

STRIPE = {"LORAPLEX_STRIPE_API_KEY", "LORAPLEX_STRIPE_WEBHOOK_SECRET"}
BASICS = {"DATABASE_URL", "LORAPLEX_CONSOLE_SECRET"}  # what every set-up needs in the secret


class StandInModal:
    """Stand-in for Modal's cloud: named secrets with their keys, named volumes with their entries. It fails the way
    `Secret.from_name(name, required_keys=...).hydrate()` and `Volume.from_name(name).listdir("/")` fail there (the
    server refuses the lookup), and records what was asked."""

    def __init__(self, secrets: dict[str, set[str]], volumes: dict[str, list[str]]) -> None:
        self.secrets, self.volumes = secrets, volumes
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def secret(self, name: str, required_keys: Sequence[str]) -> None:
        self.asked.append((name, tuple(required_keys)))
        if name not in self.secrets:
            raise Missing(f"NotFoundError: Secret '{name}' not found in environment 'main'")
        absent = [key for key in required_keys if key not in self.secrets[name]]
        if absent:
            raise Missing(f"NotFoundError: Secret '{name}' is missing key(s): {', '.join(absent)}")

    def volume(self, name: str) -> list[str]:
        if name not in self.volumes:
            raise Missing(f"NotFoundError: Volume '{name}' not found in environment 'main'")
        return self.volumes[name]


def complete() -> StandInModal:
    return StandInModal({"loraplex-db": BASICS | STRIPE}, {"loraplex-volume": ["adapters", "base_models"]})


def head() -> str:
    """This code's latest migration, as Alembic reads it."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from app.db import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return str(ScriptDirectory.from_config(config).get_current_head())


@pytest.fixture
def postgres(platform: Platform) -> Iterator[Platform]:
    if platform.backend != "postgres":
        pytest.skip("the database a Modal set-up needs is PostgreSQL")
    yield platform


def test_a_complete_set_up(postgres: Platform) -> None:
    findings = check(complete())
    assert [(f.piece, f.ok) for f in findings] == [
        ("secret loraplex-db", True),
        ("console secret", True),
        ("Stripe keys", True),
        ("DATABASE_URL", True),
        ("database", True),
        ("volume loraplex-volume", True),
    ]
    detail = {f.piece: f.detail for f in findings}
    # migrated by the fixture, as the web function does when it starts
    assert detail["database"] == f"reachable, at migration {head()} (this code's latest)"
    assert detail["volume loraplex-volume"] == "reachable (adapters, base_models)"
    assert detail["DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1")


def test_each_missing_secret_key_is_named(postgres: Platform) -> None:
    modal = StandInModal({"loraplex-db": BASICS | {"LORAPLEX_STRIPE_API_KEY"}}, {"loraplex-volume": []})
    stripe = check(modal)[2]
    assert (stripe.piece, stripe.ok) == ("Stripe keys", False)
    assert stripe.detail.startswith("no LORAPLEX_STRIPE_WEBHOOK_SECRET (NotFoundError: Secret 'loraplex-db' is missing")
    assert (
        "add LORAPLEX_STRIPE_API_KEY=... LORAPLEX_STRIPE_WEBHOOK_SECRET=... to the secret loraplex-db" in stripe.detail
    )
    # one lookup per key, each asking Modal's server for that key alone
    assert modal.asked == [
        ("loraplex-db", ("DATABASE_URL",)),
        ("loraplex-db", ("LORAPLEX_CONSOLE_SECRET",)),
        ("loraplex-db", ("LORAPLEX_STRIPE_API_KEY",)),
        ("loraplex-db", ("LORAPLEX_STRIPE_WEBHOOK_SECRET",)),
    ]
    assert [f.ok for f in check(modal, stripe=False)] == [True, True, True, True, True]  # --without-stripe


def test_no_secret_and_no_volume(postgres: Platform) -> None:
    findings = {f.piece: f for f in check(StandInModal({}, {}), stripe=False)}
    secret, volume = findings["secret loraplex-db"], findings["volume loraplex-volume"]
    assert not secret.ok and secret.detail == (
        "no DATABASE_URL (NotFoundError: Secret 'loraplex-db' not found in environment 'main'); "
        "modal secret create loraplex-db DATABASE_URL=..."
    )
    assert not volume.ok and "modal volume create loraplex-volume" in volume.detail
    console = findings["console secret"]
    assert not console.ok and "add LORAPLEX_CONSOLE_SECRET=<32+ random characters> to the secret" in console.detail
    assert findings["database"].ok  # the database itself is there


def test_the_database_unset_unreachable_or_migrated_by_a_newer_release(
    postgres: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    with get_engine().begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    database = {f.piece: f for f in check(complete())}["database"]
    assert not database.ok and "at migration 0099_from_the_future, which this code does not know" in database.detail

    with get_engine().begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    database = {f.piece: f for f in check(complete())}["database"]
    assert database.ok and database.detail == f"reachable, empty: the web function migrates it to {head()} as it starts"

    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/loraplex")  # nothing listens on port 1
    get_settings.cache_clear()
    database = {f.piece: f for f in check(complete())}["database"]
    assert not database.ok and database.detail.startswith("cannot connect: OperationalError")

    monkeypatch.delenv("DATABASE_URL")
    get_settings.cache_clear()
    url = {f.piece: f for f in check(complete())}["DATABASE_URL"]
    assert not url.ok and url.detail.startswith(
        "not set in this shell: export the URL stored in the secret loraplex-db"
    )


def test_a_sqlite_database_cannot_serve_modal(sqlite_platform: Platform) -> None:
    findings = {f.piece: f for f in check(complete())}
    assert not findings["DATABASE_URL"].ok
    assert findings["DATABASE_URL"].detail.startswith("sqlite database: Modal's containers share no disk")
    assert "database" not in findings


def test_the_command_prints_what_is_missing_and_exits_1(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    missing_volume = StandInModal({"loraplex-db": BASICS | STRIPE}, {})
    monkeypatch.setattr(cli_modal, "live_lookups", lambda: missing_volume)
    result = CliRunner().invoke(cli.app, ["modal-check"])
    lines = result.output.splitlines()
    assert lines[0] == "ok      secret loraplex-db: has DATABASE_URL"
    assert (
        "MISSING volume loraplex-volume: not found (NotFoundError: Volume 'loraplex-volume' not found" in result.output
    )
    if platform.backend == "postgres":
        assert result.exit_code == 1 and lines[-1] == "missing: volume loraplex-volume"
        monkeypatch.setattr(cli_modal, "live_lookups", complete)
        result = CliRunner().invoke(cli.app, ["modal-check"])
        assert result.exit_code == 0 and result.output.splitlines()[-1] == "ready: modal deploy -m app.modal_app"
    else:
        assert result.exit_code == 1 and lines[-1] == "missing: DATABASE_URL, volume loraplex-volume"
    result = CliRunner().invoke(cli.app, ["modal-check", "--without-stripe"])
    assert "Stripe keys" not in result.output
