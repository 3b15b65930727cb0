#!/usr/bin/env bash
# The prepared GPU check of the CUDA backend (issue G). Two halves:
#
#   scripts/gpu-check.sh --build    on the build machine (Rust, no GPU): builds the check binary
#                                   into target/gpu-check/gpu_check (carry that path).
#   scripts/gpu-check.sh [BINARY]   on the GPU machine (no Rust, no network; CUDA 13.0, driver
#                                   580): finds libcuda.so.1, libnvrtc.so* and libcublas.so*,
#                                   sets LD_LIBRARY_PATH, runs the binary (default
#                                   target/gpu-check/gpu_check) under a 5-minute limit. It
#                                   prints the correctness table against the CPU oracle, then
#                                   the timings; exit 0 = every check under its threshold.
#
# Set RRT_CUDA_SYNC=1 to synchronise after every launch (a fault is then reported by the
# operation that caused it).
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

# Candidate library folders: the loader cache, CUDA toolkits, Python wheels (PyTorch's nvidia-*).
dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         /usr/lib/x86_64-linux-gnu /usr/lib64; do
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

find_lib() { # name pattern -> first folder that has it (loader cache first)
    local pat="$1" hit
    hit="$(ldconfig -p 2>/dev/null | awk -v p="$pat" '$1 ~ p {print $NF; exit}')"
    if [[ -n "$hit" ]]; then echo "$hit"; return; fi
    for d in "${dirs[@]}"; do
        hit="$(find "$d" -maxdepth 1 -name "$pat*" 2>/dev/null | sort | head -1)"
        if [[ -n "$hit" ]]; then echo "$hit"; return; fi
    done
}

ldpath=""
missing=0
for lib in libcuda.so.1 libnvrtc.so libcublas.so libcublasLt.so; do
    f="$(find_lib "$lib")"
    if [[ -z "$f" ]]; then
        echo "gpu-check: $lib NOT FOUND (ldconfig -p, ${dirs[*]})"
        missing=1
    else
        echo "gpu-check: $lib -> $f"
        d="$(dirname "$f")"
        [[ ":$ldpath:" == *":$d:"* ]] || ldpath="${ldpath:+$ldpath:}$d"
    fi
done
export LD_LIBRARY_PATH="$ldpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
[[ $missing == 0 ]] || echo "gpu-check: a library is missing; the check will say which one it needed"

timeout 270 "$bin"
rc=$?
[[ $rc == 124 ]] && echo "gpu-check: TIMED OUT after 270 s"

# End to end: engine tokens/s of SmolLM2-shaped models (random weights, B = 1 and B = 3 with
# rank-64 LoRAs, made here by PyTorch) on the CUDA backend against the CPU backend of the same
# machine, the same requests (settings a and c of `rrt bench engine`, full depth).
rrt_bin="$(dirname "$bin")/rrt"
like="$(dirname "$bin")/like"
if [[ -x "$rrt_bin" && -f "$like/rrt_checkpoint.json" ]] && command -v python3 >/dev/null; then
    e2e=/tmp/rrt-e2e
    mkdir -p "$e2e"
    if ! { PYTHONPATH="$root/train" python3 -m rrt_train tiny --like "$like" --loops 1 --out "$e2e/rand-b1" >/dev/null &&
           PYTHONPATH="$root/train" python3 -m rrt_train tiny --like "$like" --loops 3 --rank 64 --out "$e2e/rand-b3" >/dev/null; }; then
        echo "gpu-check: could not write the random checkpoints"
        exit 1
    fi
    for dev in cuda:0 cpu; do
        echo "gpu-check: engine, device $dev"
        timeout 120 "$rrt_bin" bench engine --device "$dev" --model "$e2e/rand-b1" --checkpoint "$e2e/rand-b3" \
            --settings a,c --concurrency 1,8,32 --requests 32 --text data/calibration.txt || echo "gpu-check: engine run on $dev failed or timed out"
    done
else
    echo "gpu-check: no rrt binary or model config next to $bin: end-to-end part skipped"
fi
exit $rc
