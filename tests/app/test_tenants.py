"""Tenant names follow the one name rule (app/names.py), matched in full, from the CLI and in code alike."""

import subprocess
import sys

import pytest
from sqlalchemy import func, select

from conftest import Platform


@pytest.mark.parametrize("name", ["acme\n", "", "two words", "x" * 101, "-lead"])
def test_a_bad_tenant_name_is_refused_and_nothing_is_written(platform: Platform, name: str) -> None:
    from app.db import session_scope
    from app.models import Tenant
    from billing.signup import create_tenant

    with pytest.raises(ValueError, match="letters, digits"), session_scope() as s:
        create_tenant(s, name)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Tenant)) == 0


def test_the_cli_refuses_a_name_ending_in_a_newline(platform: Platform) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "tenant", "create", "acme\n"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "letters, digits" in run.stderr
    assert "API key" not in run.stdout
