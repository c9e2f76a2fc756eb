#!/usr/bin/env bash
# The test suite (SQLite and, when reachable, PostgreSQL at 127.0.0.1:5432), then ruff, the type checker and the
# layer contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
.venv/bin/ruff check .
.venv/bin/mypy  # app/, functions/, billing/, web/ ([tool.mypy] in pyproject.toml): zero errors
.venv/bin/lint-imports  # the layers in pyproject.toml: dependencies point one way
