#!/usr/bin/env bash
# Item 6 of issue K in one run: the vanilla model (a) against each recursive checkpoint at full
# depth (c), with its calibrated exits (d) and with oracle exits (e), the checkpoints measured
# alternately in the same session so their ratios share the host's state.
#
#   scripts/recursive-vs-vanilla.sh OUT_DIR NAME=CHECKPOINT[@SETTINGS] [NAME=CHECKPOINT ...]
#
# Each CHECKPOINT must carry calibrated thresholds (setting d). Environment: ROUNDS (2),
# CONCURRENCY (32), PROMPT (32), OUTPUT (128), REPS (2), SETTINGS (a,c,d,e) and the node's
# RRT_NODE__CPU_PRODUCTS (int8 by default here). Every round runs `rrt bench engine
# --checkpoint CKPT --settings SETTINGS` once per checkpoint, so (a) is measured beside each
# checkpoint's settings and every ratio divides by the (a) of its own call. `@a,d` after a
# checkpoint runs only those settings for it (another calibration of the same weights, say).
# Writes OUT_DIR/runs.jsonl (one line per setting and call) and prints a markdown table.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
out=$1; shift
rrt=${RRT_BIN:-target/release/rrt}
export RRT_NODE__CPU_PRODUCTS=${RRT_NODE__CPU_PRODUCTS:-int8}
mkdir -p "$out"
: > "$out/runs.jsonl"
machine_line | tee "$out/machine.txt"
for round in $(seq "${ROUNDS:-2}"); do
  for pair in "$@"; do
    name=${pair%%=*} ckpt=${pair#*=} settings=${SETTINGS:-a,c,d,e}
    if [[ $ckpt == *@* ]]; then settings=${ckpt##*@} ckpt=${ckpt%@*}; fi
    "$rrt" bench engine --checkpoint "$ckpt" --settings "$settings" \
      --concurrency "${CONCURRENCY:-32}" --prompt-tokens "${PROMPT:-32}" \
      --max-tokens "${OUTPUT:-128}" --reps "${REPS:-2}" --json \
      | python3 -c 'import json, sys
for l in sys.stdin:
    if l.strip():
        r = json.loads(l); r["round"] = int(sys.argv[1]); r["checkpoint"] = sys.argv[2]; print(json.dumps(r))' \
        "$round" "$name" >> "$out/runs.jsonl"
    echo "recursive-vs-vanilla: round $round, $name done" >&2
  done
done
python3 - "$out/runs.jsonl" <<'PY'
import json, sys
from collections import defaultdict
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
calls = defaultdict(dict)  # (round, checkpoint, concurrency) -> setting -> run
for r in runs:
    calls[(r["round"], r["checkpoint"], r["concurrency"])][r["setting"]] = r
print("| round | checkpoint | in flight | (a) tok/s | setting | tok/s | mean loops | ratio to (a) |")
print("|---:|---|---:|---:|---|---:|---:|---:|")
for (rnd, ck, c), s in sorted(calls.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
    a = s.get("a")
    for name in sorted(x for x in s if x != "a"):
        r = s[name]
        ratio = f"**{r['tok_s'] / a['tok_s']:.2f}x**" if a else "-"
        print(f"| {rnd} | {ck} | {c} | {a['tok_s'] if a else float('nan'):.1f} | ({name}) | "
              f"{r['tok_s']:.1f} | {r['mean_loops']:.2f} | {ratio} |")
PY
