#!/usr/bin/env bash
# Create .venv with the exact versions this project is tested with, and install fuselabel into it.
# torch 2.14.1 / torchvision 0.29.1 are taken from the machine's local wheel store when pip is set up for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-lock.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "fuselabel installed in $(pwd)/.venv"
