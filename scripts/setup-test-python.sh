#!/usr/bin/env bash
# Creates .venv-test with the Python clients the cluster test drives (grpcio + grpcio-tools
# for stubs generated from our .proto files, the official openai package). Idempotent. Where
# `python3 -m venv` is unavailable (Debian without python3-venv), installs the packages into
# .venv-test/site with `pip --target` behind a small .venv-test/bin/python wrapper.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-test"
pkgs=("grpcio>=1.60" "grpcio-tools>=1.60" "openai>=1.40")
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import grpc, grpc_tools, openai" 2>/dev/null; then
  echo "test clients present: $venv"
  exit 0
fi
rm -rf "$venv"
if python3 -m venv "$venv" 2>/dev/null && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  "$venv/bin/pip" install -q "${pkgs[@]}"
else
  rm -rf "$venv"
  mkdir -p "$venv/bin" "$venv/site"
  python3 -m pip install -q --target "$venv/site" "${pkgs[@]}"
  cat > "$venv/bin/python" <<WRAP
#!/usr/bin/env bash
export PYTHONPATH="$venv/site\${PYTHONPATH:+:\$PYTHONPATH}"
exec python3 "\$@"
WRAP
  chmod +x "$venv/bin/python"
fi
"$venv/bin/python" -c "import grpc, grpc_tools, openai"
echo "test clients installed: $venv"
