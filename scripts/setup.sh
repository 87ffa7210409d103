#!/usr/bin/env bash
# Create .venv and install fastmoco with its tests' dependencies.
# CPU machines: torch/torchvision pinned by constraints/cpu.txt.
# GPU box with its own torch: FASTMOCO_CONSTRAINTS=none bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
constraints=${FASTMOCO_CONSTRAINTS:-constraints/cpu.txt}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$constraints" != none ]; then
  "${pip[@]}" -c "$constraints" torch torchvision
  "${pip[@]}" -c "$constraints" -e ".[test]"
else
  "${pip[@]}" -e ".[test]"
fi
.venv/bin/python -c "import fastmoco, torch, timm, deepspeed, nvidia.dali; print('fastmoco setup ok: torch', torch.__version__)" 2>&1 | grep -v "^\[" || true
