#!/usr/bin/env bash
# Create the separate virtual environment for the NVIDIA ModelOpt cross-check (benchmarks/modelopt_crosscheck.py).
#
# ModelOpt 0.47 caps transformers below 5.15, which conflicts with armor-export's transformers 5.23, so it
# lives in its own venv (.venv-modelopt at the repository root, gitignored). torch is pinned to 2.13.0 so pip
# takes the CPU wheel instead of a CUDA build. Never run by the tests.
#
# Usage: bash benchmarks/modelopt_env.sh [VENV_DIR]     (default: .venv-modelopt)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-modelopt}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0 nvidia-modelopt
"$VENV/bin/pip" install -q requests "transformers<5.15,>=4.57" accelerate safetensors
"$VENV/bin/python" - <<'EOF'
import modelopt, torch, transformers
import modelopt.torch.sparsity  # noqa: F401  (fails without `requests`)
print(f"modelopt {modelopt.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
