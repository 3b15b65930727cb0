#!/usr/bin/env bash
# Validates `rrt capacity` against the local CPU cluster (BENCHMARKS.md, "Capacity planning
# validated against the cluster"): starts N `rrt node`s and a coordinator with span files,
# drives them with `rrt bench load` (open loop, per-request records), stops them, and prints
# `rrt capacity --validate` (predicted vs measured).
#   scripts/validate-capacity.sh [NODES=1] [RATES=0.9,1.1,1.3,1.5] [SECONDS=120] [OUT=bench-out/cap]
# Limits for the comparison: TTFT_P99_MS (2000), TPOT_P99_MS (500). Model: RRT_MODEL or the
# `rrt serve` default checkpoint (run `rrt serve` once to make it). EXIT_THRESHOLD (0.6; empty:
# none, for a model without loops). CI runs a short version on the GGUF model (.ci/run): it
# fails when the planner cannot fit the spans the engine writes (a renamed span field).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
n="${1:-1}" rates="${2:-0.9,1.1,1.3,1.5}" secs="${3:-120}" out="${4:-$root/bench-out/cap}"
rrt="$root/target/release/rrt"
threshold="${EXIT_THRESHOLD-0.6}"
model="${RRT_MODEL:-$root/models/SmolLM2-135M-Instruct-rrt-b2-average-r256-activation}"
mkdir -p "$out"
rm -f "$out"/v"$n"-*.jsonl
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
nodes=""
traces=""
for i in $(seq 1 "$n"); do
  port=$((7700 + i))
  "$rrt" node --model "$model" --listen "127.0.0.1:$port" --trace-file "$out/v$n-node$i.jsonl" \
    >"$out/v$n-node$i.log" 2>&1 &
  pids+=($!)
  nodes="$nodes,127.0.0.1:$port"
  traces="$traces,$out/v$n-node$i.jsonl"
done
sleep 6
"$rrt" coordinator --nodes "${nodes#,}" --grpc-listen 127.0.0.1:7700 --http-listen 127.0.0.1:8700 \
  --trace-file "$out/v$n-coord.jsonl" >"$out/v$n-coord.log" 2>&1 &
pids+=($!)
sleep 3
"$rrt" bench load --target http://127.0.0.1:7700 --rate "$rates" --duration "$secs" --warmup 10 --cooldown 3 \
  --prompt-tokens uniform:16:96 --output-tokens uniform:8:48 ${threshold:+--exit-threshold "$threshold"} --seed 5 \
  --per-request --json "$out/v$n-bench.json" --plot "$out/v$n-bench"
kill "${pids[@]}" 2>/dev/null || true
sleep 2
"$rrt" capacity --traces "${traces#,},$out/v$n-coord.jsonl" --validate "$out/v$n-bench.json" --nodes "$n" \
  --ttft-p99-ms "${TTFT_P99_MS:-2000}" --tpot-p99-ms "${TPOT_P99_MS:-500}"
