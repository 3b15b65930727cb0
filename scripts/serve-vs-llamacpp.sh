#!/usr/bin/env bash
# Output throughput through the servers (a benchmark, not a test): `rrt serve` (int8 products)
# and llama-server on the same GGUF, same machine, alternating, closed loop at 1, 8 and 32 in
# flight. Every (round, load point, server) gets its own seed, so every prompt is new to the
# server that sees it: no prompt cache can serve a repeat (one `rrt bench load` call per point,
# as the points of one call share their prompts). Prompts uniform 64-192 tokens, outputs 64
# tokens with ignore_eos. llama-server gets one slot per request in flight (-np 32).
#
# llama-server is built as llama-batched-bench is (scripts/bench-vs-llamacpp.sh), target
# llama-server; then: LLAMA_SERVER=/path/to/llama-server scripts/serve-vs-llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
RUNS="${RUNS:-2}" C="${C:-1,8,32}" REQUESTS="${REQUESTS:-48}" PRODUCTS="${PRODUCTS:-int8}"
cargo build --release -p rrt >/dev/null
RRT=./target/release/rrt
args=(--prompt-tokens uniform:64:192 --output-tokens fixed:64
      --requests "$REQUESTS" --tokens-per-word 1.3 --quiet)
. scripts/bench-lib.sh
machine_line
for run in $(seq "$RUNS"); do
  start_rrt "$model" RRT_NODE__CPU_PRODUCTS="$PRODUCTS"
  echo "== run $run: rrt serve (node.cpu_products $PRODUCTS)"
  for c in ${C//,/ }; do
    $RRT bench load --target http://127.0.0.1:17300 "${args[@]}" --concurrency "$c" --seed "${run}${c}1"
  done
  stop_server
  start_llama_server "$model" -np 32 -c 16384
  echo "== run $run: llama-server (-np 32)"
  for c in ${C//,/ }; do
    $RRT bench load --api http --target http://127.0.0.1:18081 "${args[@]}" --concurrency "$c" --seed "${run}${c}2"
  done
  stop_server
done
