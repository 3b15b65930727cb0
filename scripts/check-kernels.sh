#!/usr/bin/env bash
# CPU-only CI check of the CUDA kernels: installs NVRTC and ptxas 13.0 from PyPI into
# .venv-cuda (no GPU, no CUDA toolkit needed), compiles every kernel family with NVRTC for
# sm_90 through cudarc, fails on any compile error or warning, runs `ptxas -arch=sm_90 -v` on
# each PTX, fails if a product kernel spills, and writes the table to kernels/PTXAS.md.
# Also runs the crate's unit tests with the feature on (host planning, no-driver fallback).
#
# Usage: scripts/check-kernels.sh            (from anywhere inside the repository)
# Env:   CARGO_TARGET_DIR (default: the workspace's), PYTHON (default python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv-cuda"
py="${PYTHON:-python3}"
# Pinned to 13.0.x: PTX from a newer NVRTC can be refused by the 13.0 driver of the GPU machines.
pkgs=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88)

if [[ ! -x "$venv/bin/python" ]]; then
    "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip show nvidia-cuda-nvrtc nvidia-cuda-nvcc 2>/dev/null | grep -q '^Version: 13.0.88'; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${pkgs[@]}"
fi
cu13="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
lib="$cu13/lib"
bin="$cu13/bin"
for f in "$lib/libnvrtc.so.13" "$bin/ptxas"; do
    [[ -e "$f" ]] || { echo "check-kernels: missing $f after pip install" >&2; exit 1; }
done
echo "check-kernels: NVRTC $lib/libnvrtc.so.13, ptxas $("$bin/ptxas" --version | tail -1)"

export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$bin:$PATH"
export RRT_REQUIRE_NVRTC=1
export RRT_PTXAS_REPORT="$root/kernels/PTXAS.md"
cargo test -p rrt-kernels --release --features cuda --test nvrtc_compile -- --nocapture
cargo test -p rrt-kernels --release --features cuda --lib
echo "check-kernels: ok (ptxas table in kernels/PTXAS.md)"
