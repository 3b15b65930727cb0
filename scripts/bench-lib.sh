# Shared by the benchmark scripts that compare servers (sourced, not run).

# The machine line every benchmark prints first.
machine_line() {
  echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; date $(date -u +%F)"
}

wait_for() { for _ in $(seq 120); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; return 1; }

# start_rrt MODEL [VAR=VALUE ...]: `rrt serve` on HTTP 18080 / gRPC 17300 with those
# environment settings, ready when this returns; SERVER_PID is its pid.
start_rrt() {
  local model="$1"; shift
  env "$@" ./target/release/rrt serve --model "smol=$model" \
    --http-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:17300 >/dev/null 2>&1 &
  SERVER_PID=$!
  wait_for http://127.0.0.1:18080/v1/models
}

# start_llama_server MODEL [ARGS ...]: llama-server ($LLAMA_SERVER) on port 18081, one thread
# per core, with ARGS; ready when this returns; SERVER_PID is its pid.
start_llama_server() {
  local model="$1"; shift
  "$LLAMA_SERVER" -m "$model" --port 18081 -t "$(nproc)" "$@" >/dev/null 2>&1 &
  SERVER_PID=$!
  wait_for http://127.0.0.1:18081/health
}

stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; }
