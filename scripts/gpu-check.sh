#!/usr/bin/env bash
# The prepared GPU check of the CUDA backend. Two halves:
#
#   scripts/gpu-check.sh --build    on the build machine (Rust, no GPU): builds the check binary
#                                   and `rrt` with CUDA into target/gpu-check/ (carry that path).
#   scripts/gpu-check.sh [BINARY]   on the GPU machine (no Rust, no network; CUDA 13.0, driver
#                                   580): finds libcuda.so.1, libnvrtc.so* (13.0 preferred: the
#                                   build targets it) and libcublas.so* (optional: only the
#                                   timing baselines need it), sets LD_LIBRARY_PATH, then
#                                   1. the kernel check (target/gpu-check/gpu_check): a smoke
#                                      test first (seconds), the correctness table against the
#                                      CPU oracle, then the timings;
#                                   2. end to end on SmolLM2-shaped random checkpoints: the GPU
#                                      engine's greedy tokens against the CPU engine's (same
#                                      requests; divergence only at near ties), then engine
#                                      tokens/s on the GPU.
#                                   Exit 0 = every check passed. Under 8 minutes in all; kernels
#                                   are compiled once (kernel cache in $RRT_KERNEL_CACHE).
#
# Env: RRT_CUDA_SYNC=1 synchronises after every launch (a fault is then reported by the
# operation that caused it); GPU_CHECK_OUT=DIR keeps the Markdown tables and logs there;
# GPU_CHECK_CPU_BENCH=1 also measures the CPU engine's tokens/s on the same machine.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "${1:-}" == "--build" ]]; then
    set -e
    cargo build -p rrt-kernels --release --features cuda --example gpu_check
    cargo build -p rrt --release --features cuda
    tdir="${CARGO_TARGET_DIR:-$root/target}"
    mkdir -p target/gpu-check/like
    cp "$tdir/release/examples/gpu_check" target/gpu-check/gpu_check
    cp "$tdir/release/rrt" target/gpu-check/rrt
    # Without debug sections: the two binaries go from 175 MB to 26 MB (a GPU call carries
    # 64 MiB in all).
    strip target/gpu-check/gpu_check target/gpu-check/rrt
    # The kernels as sm_90 machine code, compiled here by the same NVRTC (13.0.88, from PyPI via
    # scripts/check-kernels.sh's .venv-cuda) the GPU machine has: its check then loads them from
    # this cache instead of compiling (the cache key holds the NVRTC version: another version
    # there just compiles again).
    nvrtc_lib="$(ls -d "$root"/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)"
    rm -rf target/gpu-check/kernel-cache
    if [[ -n "$nvrtc_lib" ]]; then
        LD_LIBRARY_PATH="$nvrtc_lib" RRT_KERNEL_CACHE="$root/target/gpu-check/kernel-cache" \
            target/gpu-check/gpu_check --precompile 9.0
    else
        echo "no .venv-cuda (scripts/check-kernels.sh makes it): the GPU machine will compile the kernels"
    fi
    # SmolLM2's architecture, tokenizer and chat template (not its weights: the model files
    # exceed what a GPU call can carry), for the end-to-end part on random weights.
    like="${RRT_LIKE:-$root/models/SmolLM2-135M-Instruct-teacher-b1}"
    [[ -f "$like/rrt_checkpoint.json" ]] || target/gpu-check/rrt convert --out "$like" --loops 1
    cp "$like/rrt_checkpoint.json" "$like/tokenizer.json" target/gpu-check/like/
    echo "built target/gpu-check ($(du -sh target/gpu-check | cut -f1)); carry target/gpu-check"
    exit 0
fi

bin="${1:-target/gpu-check/gpu_check}"
[[ -x "$bin" ]] || { echo "gpu-check: no binary at $bin (run scripts/gpu-check.sh --build on the build machine)"; exit 2; }

# Candidate library folders: driver mounts, CUDA toolkits, the loader's usual folders, Python
# wheels (PyTorch's nvidia-*).
dirs=()
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda-13.0/targets/x86_64-linux/lib \
         /usr/local/cuda-13.0/lib64 /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
         /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu; do
    [[ -d "$d" ]] && dirs+=("$d")
done
for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1; then
        while IFS= read -r d; do [[ -d "$d" ]] && dirs+=("$d"); done < <("$py" - <<'PY' 2>/dev/null
import glob, os, site
roots = set(site.getsitepackages() + [site.getusersitepackages()])
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu13", "lib")):
        print(d)
PY
)
        break
    fi
done

# Every file matching a library name: the loader cache first, then the folders above.
candidates() {
    local pat="$1"
    ldconfig -p 2>/dev/null | awk -v p="$pat" '$1 ~ "^"p {print $NF}'
    for d in "${dirs[@]}"; do
        find "$d" -maxdepth 1 -name "$pat*" 2>/dev/null | sort
    done
}

# The first candidate whose resolved file name starts with `prefer` (e.g. libnvrtc.so.13.0),
# else the first candidate.
find_lib() {
    local pat="$1" prefer="${2:-}" f first=""
    while IFS= read -r f; do
        [[ -e "$f" ]] || continue
        [[ -z "$first" ]] && first="$f"
        if [[ -n "$prefer" && "$(basename "$(readlink -f "$f")")" == "$prefer"* ]]; then
            echo "$f"
            return
        fi
    done < <(candidates "$pat")
    echo "$first"
}

ldpath=""
missing=0
for spec in "libcuda.so.1:" "libnvrtc.so:libnvrtc.so.13.0" "libcublas.so:" "libcublasLt.so:"; do
    lib="${spec%%:*}"
    prefer="${spec#*:}"
    f="$(find_lib "$lib" "$prefer")"
    if [[ -z "$f" ]]; then
        case "$lib" in
            libcublas*) echo "gpu-check: $lib not found (optional: the timing baselines are left out)" ;;
            *) echo "gpu-check: $lib NOT FOUND (ldconfig -p, ${dirs[*]})"; missing=1 ;;
        esac
    else
        echo "gpu-check: $lib -> $f ($(basename "$(readlink -f "$f")"))"
        d="$(dirname "$f")"
        [[ ":$ldpath:" == *":$d:"* ]] || ldpath="${ldpath:+$ldpath:}$d"
    fi
done
export LD_LIBRARY_PATH="$ldpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
[[ $missing == 0 ]] || echo "gpu-check: a library is missing; the smoke test will say which one it needed"

out="${GPU_CHECK_OUT:-/tmp/gpu-check-out}"
mkdir -p "$out"
export RRT_CHECK_OUT="$out"
# The kernel cache shipped with the binaries (see --build), else a fresh one.
if [[ -z "${RRT_KERNEL_CACHE:-}" ]]; then
    RRT_KERNEL_CACHE=/tmp/rrt-kernel-cache
    mkdir -p "$RRT_KERNEL_CACHE"
    [[ -d "$(dirname "$bin")/kernel-cache" ]] && cp "$(dirname "$bin")"/kernel-cache/*.cubin "$RRT_KERNEL_CACHE"/ 2>/dev/null
fi
export RRT_KERNEL_CACHE
export RRT_CHECK_BUDGET_S="${RRT_CHECK_BUDGET_S:-240}"
timeout 300 "$bin"
rc=$?
[[ $rc == 124 ]] && echo "gpu-check: TIMED OUT after 300 s"
[[ $rc == 2 ]] && { echo "gpu-check: no usable GPU or library: stopping here"; exit 2; }

# End to end (GPU_CHECK_E2E: which parts, default "smollm2,ouro"):
# - smollm2: SmolLM2-shaped models with random weights (B = 1, and B = 3 with rank-64 LoRAs,
#   made here by PyTorch): (1) the GPU engine's greedy tokens against the CPU engine's on the
#   same requests at concurrency 8 (depth-wise batches mixing depths); a request may diverge
#   only where the CPU model's two candidates are a near tie; (2) tokens/s of settings a and c
#   of `rrt bench engine` on the GPU (and on the CPU with GPU_CHECK_CPU_BENCH=1).
# - ouro: a tiny random Ouro (bf16 weights, `rrt random-model`): GPU tokens against CPU tokens
#   at every step and with a replayed exit mix; then a random Ouro-1.4B (written here): all
#   steps sequence-wise (b) and depth-wise (c) against depth-wise with 40/30/20/10 % of tokens
#   exiting after steps 1/2/3/4 (m), tokens/s at concurrency 32.
rrt_bin="$(dirname "$bin")/rrt"
like="$(dirname "$bin")/like"
parts="${GPU_CHECK_E2E:-smollm2,ouro}"
e2e_rc=0
e2e=/tmp/rrt-e2e
mkdir -p "$e2e"
have_rrt=0
[[ -x "$rrt_bin" && -f "$like/rrt_checkpoint.json" ]] && have_rrt=1
if [[ $have_rrt == 0 ]]; then
    echo "gpu-check: no rrt binary or model config next to $bin: end-to-end part skipped (counts as a failure)"
    e2e_rc=1
fi
if [[ $have_rrt == 1 && ",$parts," == *",smollm2,"* ]]; then
    if ! { PYTHONPATH="$root/train" python3 -m rrt_train tiny --like "$like" --loops 1 --round bf16 --out "$e2e/rand-b1" >/dev/null &&
           PYTHONPATH="$root/train" python3 -m rrt_train tiny --like "$like" --loops 3 --rank 64 --round bf16 --out "$e2e/rand-b3" >/dev/null; }; then
        echo "gpu-check: could not write the random checkpoints"
        exit 1
    fi
    # Token comparisons. The GEMV path (16 rows per pass: f32 activations) and f16 weights on
    # the tensor cores must diverge only at near ties; bf16 activations on the tensor cores
    # perturb a looped random model more (GPU run 3: gaps up to 0.12 logit std), so that
    # variant is reported, not judged.
    cmp=(bench engine --device cuda:0 --compare-cpu --model "$e2e/rand-b1" --checkpoint "$e2e/rand-b3"
         --settings a,c --concurrency 8 --requests 16 --max-tokens 24,40 --text data/calibration.txt)
    for v in "bf16 16 0.02" "f16 256 0.02" "bf16 256 1000"; do
        read -r w rows tol <<<"$v"
        echo "gpu-check: engine tokens, cuda:0 ($w weights, $rows rows per pass) against cpu, tie tolerance $tol"
        timeout 120 "$rrt_bin" "${cmp[@]}" --gpu-weights "$w" --max-step-rows "$rows" --tie-tolerance "$tol" \
            | tee "$out/tokens-$w-$rows.md" || { echo "gpu-check: token comparison FAILED or timed out"; e2e_rc=1; }
    done
    devices=(cuda:0)
    [[ "${GPU_CHECK_CPU_BENCH:-0}" == 1 ]] && devices+=(cpu)
    for dev in "${devices[@]}"; do
        echo "gpu-check: engine tokens/s, device $dev"
        timeout 120 "$rrt_bin" bench engine --device "$dev" --model "$e2e/rand-b1" --checkpoint "$e2e/rand-b3" \
            --settings a,c --concurrency 1,8,32 --requests 32 --text data/calibration.txt | tee "$out/engine-${dev%%:*}.md" \
            || { echo "gpu-check: engine run on $dev failed or timed out"; e2e_rc=1; }
    done
fi
if [[ $have_rrt == 1 && ",$parts," == *",ouro,"* ]]; then
    if ! "$rrt_bin" random-model --like ouro-tiny --model "$like" --seed 5 --out "$e2e/ouro-tiny" >/dev/null; then
        echo "gpu-check: could not write the tiny Ouro"
        exit 1
    fi
    echo "gpu-check: Ouro engine tokens, cuda:0 (16 rows per pass) against cpu: every step (c), exit mix (m)"
    timeout 120 "$rrt_bin" bench engine --device cuda:0 --compare-cpu --model "$like" --checkpoint "$e2e/ouro-tiny" \
        --settings c,m --exit-mix 0.4,0.3,0.2,0.1 --concurrency 8 --requests 16 --max-tokens 24,40 --max-step-rows 16 \
        --text data/calibration.txt | tee "$out/ouro-tokens.md" || { echo "gpu-check: Ouro token comparison FAILED or timed out"; e2e_rc=1; }
    if "$rrt_bin" random-model --like ouro-1.4b --model "$like" --seed 1 --out "$e2e/ouro-1.4b"; then
        echo "gpu-check: Ouro-1.4B (random) engine tokens/s, cuda:0"
        timeout 240 "$rrt_bin" bench engine --device cuda:0 --model "$like" --checkpoint "$e2e/ouro-1.4b" \
            --settings b,c,m --exit-mix 0.4,0.3,0.2,0.1 --concurrency 32 --requests 64 --prompt-tokens 16,32 \
            --max-tokens 64,96 --text data/calibration.txt \
            | tee "$out/ouro-1.4b-engine.md" || { echo "gpu-check: Ouro-1.4B engine run failed or timed out"; e2e_rc=1; }
    else
        echo "gpu-check: could not write the random Ouro-1.4B"
        e2e_rc=1
    fi
fi
[[ $rc == 0 && $e2e_rc == 0 ]] && echo "gpu-check: ALL PASSED" || echo "gpu-check: FAILURES (kernel check exit $rc, end to end $e2e_rc)"
[[ $rc == 0 ]] && exit $e2e_rc
exit $rc
