#!/usr/bin/env bash
# The speed/quality frontier of a gate-exit checkpoint: for each target agreement, the
# checkpoint's gate thresholds are recalibrated (the gate itself is kept), then measured on
# held-out text (`rrt eval-exit --exit calibrated`: mean loops, agreement with full depth,
# perplexity) and in the engine against the vanilla model (`rrt bench engine --settings a,d`).
#
#   scripts/exit-frontier.sh CHECKPOINT CALIB_TEXT EVAL_TEXT OUT_DIR [TARGETS]
#
# TARGETS: space-separated agreements (default "0.93 0.9 0.85 0.8 0.75"). Environment:
# CONCURRENCY (32), PROMPT (32), OUTPUT (128), REPS (2), SELF_GENERATED (24), and the node's
# RRT_NODE__CPU_PRODUCTS (int8 by default here). Writes OUT_DIR/frontier.jsonl (one line per
# target), then `rrt plot-frontier` prints the table and writes OUT_DIR/frontier.svg.
set -euo pipefail
ckpt=$1 calib=$2 eval_text=$3 out=$4
targets=${5:-"0.93 0.9 0.85 0.8 0.75"}
rrt=${RRT_BIN:-target/release/rrt}
export RRT_NODE__CPU_PRODUCTS=${RRT_NODE__CPU_PRODUCTS:-int8}
mkdir -p "$out"
: > "$out/frontier.jsonl"
for t in $targets; do
  dir="$out/ckpt-$t"
  rm -rf "$dir"
  mkdir -p "$dir"
  # The weights are shared (hard links); the config is copied, calibration rewrites it.
  for f in "$ckpt"/*; do
    case "$f" in
      *.json) cp "$f" "$dir/" ;;
      *) ln "$f" "$dir/" 2>/dev/null || cp "$f" "$dir/" ;;
    esac
  done
  "$rrt" calibrate --model "$dir" --text "$calib" --criterion gate --agreement "$t" \
    --self-generated "${SELF_GENERATED:-24}" --json > "$dir/calibrate.json"
  "$rrt" eval-exit --model "$dir" --text "$eval_text" --exit calibrated --windows 8 --json \
    > "$dir/eval.jsonl"
  "$rrt" bench engine --checkpoint "$dir" --settings a,d --concurrency "${CONCURRENCY:-32}" \
    --prompt-tokens "${PROMPT:-32}" --max-tokens "${OUTPUT:-128}" --reps "${REPS:-2}" --json \
    > "$dir/engine.jsonl"
  python3 - "$t" "$dir" >> "$out/frontier.jsonl" <<'PY'
import json, sys
t, d = float(sys.argv[1]), sys.argv[2]
ev = [json.loads(l) for l in open(f"{d}/eval.jsonl") if l.strip()]
en = [json.loads(l) for l in open(f"{d}/engine.jsonl") if l.strip()]
print(json.dumps({"target": t, "eval": ev, "engine": en}))
PY
  echo "exit-frontier: target $t done" >&2
done
"$rrt" plot-frontier --input "$out/frontier.jsonl"
