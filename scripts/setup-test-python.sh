#!/usr/bin/env bash
# Creates .venv-test with the Python clients the cluster test drives (grpcio + grpcio-tools
# for stubs generated from our .proto files, the official openai package). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-test"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import grpc, grpc_tools, openai" 2>/dev/null; then
  echo "test clients present: $venv"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q "grpcio>=1.60" "grpcio-tools>=1.60" "openai>=1.40"
echo "test clients installed: $venv"
