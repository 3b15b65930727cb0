#!/usr/bin/env bash
# Fit a recursive checkpoint's exit gate on real text plus the checkpoint's own greedy
# continuations (the tokens it decodes when served), then calibrate on it
# (BENCHMARKS.md, "A gate fitted after training").
#
#   scripts/fit-gate-selfgen.sh CKPT CALIB_TEXT [AGREEMENT] [PROMPTS] [TOKENS]
#
# PROMPTS (default 24) prompts of 150 characters at random offsets (seed 5) of
# ../shared/data/tinyshakespeare.txt, each continued for TOKENS (default 160) tokens.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rrt=${RRT_BIN:-$root/target/release/rrt}
ckpt=${1:?checkpoint}; calib=${2:?calibration text}; agreement=${3:-0.93}
prompts=${4:-24}; tokens=${5:-160}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 - "$root/../shared/data/tinyshakespeare.txt" "$prompts" > "$work/prompts.txt" <<'PY'
import random, sys
t = open(sys.argv[1]).read()
random.seed(5)
for _ in range(int(sys.argv[2])):
    o = random.randrange(0, len(t) - 400)
    print(t[o:o + 150].replace("\n", " "))
PY
while read -r p; do
  "$rrt" generate --model "$ckpt" --prompt "$p" --max-tokens "$tokens" --json 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["text"])'
done < "$work/prompts.txt" > "$work/selfgen.txt"
cat "$calib" "$work/selfgen.txt" > "$work/mix.txt"
"$rrt" calibrate --model "$ckpt" --fit-gate --tokens 20000 --text "$work/mix.txt" --agreement "$agreement"
