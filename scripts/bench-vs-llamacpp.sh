#!/usr/bin/env bash
# Forward-pass throughput of rrt and of llama.cpp's llama-batched-bench on the same model, same
# machine, same run (a benchmark, not a test). Prefill P tokens for each of B sequences, then
# G decode steps of B rows.
#
# llama.cpp is built from the llama-cpp-python source package (no other download):
#   python3 -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
#   tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
#   cd /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
#   cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build --target llama-batched-bench -j 2
# then: LLAMA_BENCH=/tmp/lcp/.../build/bin/llama-batched-bench scripts/bench-vs-llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-batched-bench binary}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
P="${P:-128}" G="${G:-64}" B="${B:-1,8,32}" T="${T:-$(nproc)}" RUNS="${RUNS:-3}"
cargo build --release -p rrt >/dev/null
. scripts/bench-lib.sh
machine_line
# The two alternate RUNS times, so that load from the machine's neighbours hits both alike;
# report the best run of each (the least disturbed).
for run in $(seq "$RUNS"); do
  echo "== run $run: rrt bench forward (model $model)"
  ./target/release/rrt bench forward --model "$model" --batch "$B" --prompt-tokens "$P" --gen-tokens "$G" --reps 1
  echo "== run $run: llama.cpp llama-batched-bench (model $model)"
  "$LLAMA_BENCH" -m "$model" -c $(( (P + G) * 32 + 256 )) -b 2048 -ub 512 -npp "$P" -ntg "$G" -npl "$B" -t "$T" 2>/dev/null | grep -E '^\|'
done
