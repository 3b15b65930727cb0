#!/usr/bin/env bash
# Time to first token with a shared system prompt (a benchmark, not a test): `rrt serve` with
# its prefix cache on and off, and llama-server (its prompt cache on, 4 slots), on the same
# model, same machine, alternating, distinct seeds per round (so no server sees the same
# random part of a prompt twice). Prompts: 448 tokens, the first 384 the same for every
# request; 16 output tokens; closed loop at 1 and 4 in flight, 12 requests each. rrt runs with
# PRODUCTS (default int8) as node.cpu_products.
#
# llama-server is built as llama-batched-bench is (scripts/bench-vs-llamacpp.sh), target
# llama-server; then: LLAMA_SERVER=/path/to/llama-server scripts/bench-prefix-cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
RUNS="${RUNS:-2}" PRODUCTS="${PRODUCTS:-int8}"
cargo build --release -p rrt >/dev/null
RRT=./target/release/rrt
args=(--prompt-tokens fixed:448 --shared-prefix-tokens 384 --output-tokens fixed:16
      --concurrency 1,4 --requests 12 --tokens-per-word 1.3 --quiet)
. scripts/bench-lib.sh
machine_line
for run in $(seq "$RUNS"); do
  for cache in 256 0; do
    start_rrt "$model" RRT_NODE__PREFIX_CACHE_MIB="$cache" RRT_NODE__CPU_PRODUCTS="$PRODUCTS"
    echo "== run $run: rrt serve, prefix cache $cache MiB (node.cpu_products $PRODUCTS)"
    $RRT bench load --target http://127.0.0.1:17300 "${args[@]}" --seed "$run$cache"
    stop_server
  done
  start_llama_server "$model" -np 4 -c 8192
  echo "== run $run: llama-server (prompt cache on, 4 slots)"
  $RRT bench load --api http --target http://127.0.0.1:18081 "${args[@]}" --seed "${run}9"
  stop_server
done
