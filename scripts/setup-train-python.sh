#!/usr/bin/env bash
# Creates .venv-train with the uptraining tool (train/, PyTorch; pinned versions from
# train/pyproject.toml) and pytest. Idempotent: does nothing when the pinned torch is there.
#
# Disk: the torch wheel on PyPI is a CUDA build whose import needs the nvidia-* libraries
# (about 4 GB installed; PyPI has no CPU-only torch and no other index is reachable). To keep
# the footprint down this installs torch without triton (641 MB, used only by torch.compile,
# which the tool does not use) and with no pip cache (the wheels would stay behind otherwise).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-train"
pyproject="$root/train/pyproject.toml"
torch_pin="$(sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' "$pyproject")"
want_torch="${torch_pin#torch==}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$want_torch" <<'PY' 2>/dev/null; then
import sys, torch, safetensors, tqdm, pytest, rrt_train
assert torch.__version__.split("+")[0] == sys.argv[1]
PY
  echo "training tool present: $venv"
  exit 0
fi
free_kb="$(df -Pk "$root" | awk 'NR==2 {print $4}')"
need_kb=$((6 * 1024 * 1024))
if [ "${free_kb:-0}" -lt "$need_kb" ]; then
  echo "setup-train-python: only $((free_kb / 1024)) MiB free under $root;" \
       "PyTorch needs about 6 GiB while installing (4 GiB once installed)" >&2
  df -h "$root" >&2
  exit 1
fi
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
"${pip[@]}" install -q --upgrade pip
# torch alone, then its requirements for this platform except triton, and the tool's own
# pins from pyproject.toml (its dependencies and the test extra, torch excepted), in one go.
"${pip[@]}" install -q --no-deps "$torch_pin"
mapfile -t deps < <("$venv/bin/python" - "$pyproject" <<'PY'
import sys, tomllib
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for spec in requires("torch") or []:
    req = Requirement(spec)
    if req.name.lower() != "triton" and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(str(req).split(";")[0].strip())
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    if Requirement(spec).name.lower() != "torch":
        print(spec)
PY
)
"${pip[@]}" install -q "${deps[@]}"
# The tool itself (editable); --no-deps so pip does not bring triton back.
"${pip[@]}" install -q --no-deps -e "$root/train"
"$venv/bin/python" -c "import torch, rrt_train; print('training tool installed:', '$venv', 'torch', torch.__version__)"
