#!/usr/bin/env bash
# GPU machine: where do the CUDA engine's greedy tokens leave the CPU engine's, and is it the
# tensor-core path's activation rounding (bf16 x and t above 16 rows per product) or a defect?
# Same random SmolLM2-shaped checkpoints as scripts/gpu-check.sh (weights rounded to bf16, so
# both backends hold the same weights), same requests, four variants of the GPU side:
#   bf16 weights, 256 rows per pass (prefill on the tensor cores: bf16 activations)
#   bf16 weights, 16 rows per pass  (every product on the GEMV path: f32 activations)
#   f16 weights,  256 rows per pass (tensor cores with f16 activations: 8x finer rounding)
# Divergences at near ties only in the 16-row run, and smaller gaps with f16, mean rounding.
# Usage (after scripts/gpu-check.sh set LD_LIBRARY_PATH, or with it set): OUT=dir scripts/gpu-token-precision.sh
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rrt=target/gpu-check/rrt
like=target/gpu-check/like
e2e=/tmp/rrt-e2e
out="${OUT:-/tmp/gpu-token-precision}"
mkdir -p "$e2e" "$out"
export RRT_KERNEL_CACHE="${RRT_KERNEL_CACHE:-/tmp/rrt-kernel-cache}"
[[ -f "$e2e/rand-b3/rrt_checkpoint.json" ]] || {
    PYTHONPATH=train python3 -m rrt_train tiny --like "$like" --loops 1 --round bf16 --out "$e2e/rand-b1" >/dev/null &&
    PYTHONPATH=train python3 -m rrt_train tiny --like "$like" --loops 3 --rank 64 --round bf16 --out "$e2e/rand-b3" >/dev/null
} || { echo "cannot write the random checkpoints"; exit 1; }
common=(bench engine --device cuda:0 --compare-cpu --model "$e2e/rand-b1" --checkpoint "$e2e/rand-b3"
        --concurrency 8 --requests 16 --max-tokens 24,40 --text data/calibration.txt --json --tie-tolerance 1000)
for v in "bf16 256 a,c" "bf16 16 c" "f16 256 a,c"; do
    read -r w rows settings <<<"$v"
    echo "== weights $w, $rows rows per pass, settings $settings"
    timeout 120 "$rrt" "${common[@]}" --settings "$settings" --gpu-weights "$w" --max-step-rows "$rows" 2>/dev/null \
        | grep '"divergences"' | tee "$out/tokens-$w-$rows.jsonl" \
        | python3 -c '
import json, sys
for line in sys.stdin:
    c = json.loads(line)
    gaps = sorted(round(abs(d[2]), 4) for d in c["divergences"])
    print("setting %s: %d/%d identical, %d/%d tokens before divergence; first-divergence gap/std sorted: %s"
          % (c["setting"], c["identical"], c["requests"], c["matched_tokens"], c["tokens"], gaps))
'
done
