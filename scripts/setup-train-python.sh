#!/usr/bin/env bash
# Creates .venv-train with the uptraining tool (train/, PyTorch; pinned versions from
# train/pyproject.toml) and pytest. Idempotent: does nothing when the pinned torch is there.
# The default torch wheel from PyPI carries CUDA libraries (about 4.5 GB installed); the CPU
# tests use only its CPU part.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-train"
want_torch="$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' "$root/train/pyproject.toml")"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$want_torch" <<'PY' 2>/dev/null; then
import sys, torch, safetensors, tqdm, pytest, rrt_train
assert torch.__version__.split("+")[0] == sys.argv[1]
PY
  echo "training tool present: $venv"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e "$root/train[test]"
"$venv/bin/python" -c "import torch, rrt_train; print('training tool installed:', '$venv', 'torch', torch.__version__)"
