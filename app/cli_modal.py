"""`loraplex modal-check`: whether a Modal set-up has what `modal deploy -m app.modal_app` needs, and exactly what
is missing.

It looks for what README.md's "Deploying on Modal" section has the operator create once:
    secret loraplex-db       with DATABASE_URL, LORAPLEX_CONSOLE_SECRET (and, for billing through Stripe, the two
                             Stripe keys)
    database                 reachable at DATABASE_URL, PostgreSQL, at a migration revision this code knows
    volume loraplex-volume   exists and can be listed
The secret's values never leave Modal (its API tells whether a secret has a key, not the value), so the database is
reached with the DATABASE_URL of the shell the check runs in: the operator exports the URL they stored.

The lookups in Modal's cloud go through `ModalLookups`, which the command gets from `live_lookups()`; the tests hand
in a stand-in, as Modal cannot be reached from where they run. The database check is real wherever it runs.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import typer
from sqlalchemy.engine import URL, make_url

from app.db import MIGRATIONS_DIR, make_engine
from app.settings import get_settings

# What app/modal_app.py mounts and reads (imported from there would load the Modal app's declarations).
DB_SECRET = "loraplex-db"
VOLUME = "loraplex-volume"
DATABASE_KEY = "DATABASE_URL"
STRIPE_KEYS = ("LORAPLEX_STRIPE_API_KEY", "LORAPLEX_STRIPE_WEBHOOK_SECRET")
CONSOLE_KEY = "LORAPLEX_CONSOLE_SECRET"  # signs the web console's sessions; containers share no file to keep one in
CONNECT_TIMEOUT_S = 10  # a database behind a firewall that drops packets would otherwise hang the check for minutes


class Missing(Exception):
    """A lookup found the piece absent or unreachable; the message says what and why."""


class ModalLookups(Protocol):
    def secret(self, name: str, required_keys: Sequence[str]) -> None:
        """Return if the secret exists with every key of `required_keys`; else raise Missing."""

    def volume(self, name: str) -> list[str]:
        """The volume's top-level entries; raise Missing if it does not exist or cannot be listed."""


@dataclass(frozen=True)
class Finding:
    piece: str  # "secret loraplex-db", "DATABASE_URL", "database", "volume loraplex-volume", "Stripe keys"
    ok: bool
    detail: str  # what was found, or what is missing and how to add it


class LiveModal:
    """The lookups against Modal's cloud, with the credentials of `modal token set` (or MODAL_TOKEN_ID/SECRET)."""

    def secret(self, name: str, required_keys: Sequence[str]) -> None:
        import modal

        try:
            # Modal's server checks required_keys on lookup: the values are never sent here.
            modal.Secret.from_name(name, required_keys=list(required_keys)).hydrate()
        except Exception as exc:  # noqa: BLE001 - any failure to find it (absent, no token, no network) is the finding
            raise Missing(f"{type(exc).__name__}: {exc}") from None

    def volume(self, name: str) -> list[str]:
        import modal

        try:
            return [entry.path for entry in modal.Volume.from_name(name).listdir("/")]
        except Exception as exc:  # noqa: BLE001 - as above
            raise Missing(f"{type(exc).__name__}: {exc}") from None


def live_lookups() -> ModalLookups:
    return LiveModal()


def check(lookups: ModalLookups, stripe: bool = True) -> list[Finding]:
    """Every finding, in the order the pieces are created; Stripe's keys only when `stripe`."""
    findings = [_secret(lookups, DB_SECRET, [DATABASE_KEY], f"modal secret create {DB_SECRET} {DATABASE_KEY}=...")]
    remedy = f"add {CONSOLE_KEY}=<32+ random characters> to the secret {DB_SECRET} (Modal's dashboard)"
    console = _secret(lookups, DB_SECRET, [CONSOLE_KEY], remedy)
    findings.append(Finding("console secret", console.ok, console.detail))
    if stripe:
        keys = " ".join(f"{key}=..." for key in STRIPE_KEYS)
        found = _secret(lookups, DB_SECRET, STRIPE_KEYS, f"add {keys} to the secret {DB_SECRET} (Modal's dashboard)")
        findings.append(Finding("Stripe keys", found.ok, found.detail))
    findings.extend(_database())
    findings.append(_volume(lookups))
    return findings


def _secret(lookups: ModalLookups, name: str, keys: Sequence[str], remedy: str) -> Finding:
    missing = []
    for key in keys:  # one lookup per key, so the finding names the very key that is missing
        try:
            lookups.secret(name, [key])
        except Missing as exc:
            missing.append((key, str(exc)))
    if not missing:
        return Finding(f"secret {name}", True, f"has {', '.join(keys)}")
    names = ", ".join(key for key, _ in missing)
    return Finding(f"secret {name}", False, f"no {names} ({missing[0][1]}); {remedy}")


def _database() -> list[Finding]:
    url = get_settings().database_url
    if not url:
        return [
            Finding(
                DATABASE_KEY,
                False,
                f"not set in this shell: export the URL stored in the secret {DB_SECRET}, so this check can reach it",
            )
        ]
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return [
            Finding(
                DATABASE_KEY,
                False,
                f"{parsed.drivername} database: Modal's containers share no disk, so they need a hosted PostgreSQL "
                "(postgresql://user:password@host:5432/db)",
            )
        ]
    shown = parsed.render_as_string(hide_password=True)
    timeout = {"connect_timeout": str(CONNECT_TIMEOUT_S)}  # libpq's, in seconds
    return [Finding(DATABASE_KEY, True, shown), _revision(parsed.update_query_dict(timeout))]


def _revision(url: URL) -> Finding:
    """Connect, and compare the database's migration revision with this code's (Alembic's)."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(config)
    heads, known = set(script.get_heads()), {revision.revision for revision in script.walk_revisions()}
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, wrong password: the finding says which
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return Finding("database", False, f"cannot connect: {type(exc).__name__}: {first_line}")
    finally:
        engine.dispose()
    head = ", ".join(sorted(heads))
    if current is None:
        return Finding("database", True, f"reachable, empty: the web function migrates it to {head} as it starts")
    if current in heads:
        return Finding("database", True, f"reachable, at migration {current} (this code's latest)")
    if current not in known:
        return Finding(
            "database",
            False,
            f"reachable, at migration {current}, which this code does not know (a newer release migrated it): "
            "deploy that release",
        )
    return Finding("database", True, f"reachable, at migration {current}: the web function migrates it to {head}")


def _volume(lookups: ModalLookups) -> Finding:
    try:
        entries = lookups.volume(VOLUME)
    except Missing as exc:
        return Finding(
            f"volume {VOLUME}", False, f"not found ({exc}); modal volume create {VOLUME} (or the first deploy makes it)"
        )
    return Finding(f"volume {VOLUME}", True, f"reachable ({', '.join(sorted(entries)) or 'empty'})")


def report(findings: list[Finding]) -> int:
    """Print the findings, one a line; the exit code: 1 if anything is missing."""
    for finding in findings:
        typer.echo(f"{'ok' if finding.ok else 'MISSING':8}{finding.piece}: {finding.detail}")
    missing = [f.piece for f in findings if not f.ok]
    typer.echo(f"missing: {', '.join(missing)}" if missing else "ready: modal deploy -m app.modal_app")
    return 1 if missing else 0
