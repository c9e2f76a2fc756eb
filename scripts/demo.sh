#!/usr/bin/env bash
# The main job: install, start the platform, fine-tune SmolLM2-135M on the sample dataset, compare answers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/loraplex demo "$@"
