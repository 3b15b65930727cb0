#!/usr/bin/env bash
# A real multi-process rrt cluster on one machine: N `rrt node` processes and one
# `rrt coordinator` in front of them, each with its own port and log file. Linux (uses /proc).
#
#   deploy/local/cluster.sh start [--nodes N] [--model PATH] [--dir RUNDIR] [--base-port P]
#                                 [--kv-mib MIB] [--config FILE] [--timeout SECS]
#   deploy/local/cluster.sh status [--dir RUNDIR]
#   deploy/local/cluster.sh stop [--dir RUNDIR] [--timeout SECS]
#
# start: starts the nodes (default 2) on loopback, then the coordinator with their addresses,
#   waits until the coordinator's /ready is 200 with every node healthy, and prints the HTTP and
#   gRPC addresses. Ports: free ones picked by the processes themselves (port 0, read back from
#   their first log line), or with --base-port P: coordinator gRPC P, HTTP P+1, node i P+2+i
#   (and its metrics port P+2+N+i). RUNDIR (default $RRT_CLUSTER_DIR or .cache/local-cluster)
#   gets node-I.log, coordinator.log, one .pid file each ("PID STARTTIME", so that a reused pid
#   is never signalled) and cluster.env (RRT_CLUSTER_HTTP, RRT_CLUSTER_GRPC, RRT_CLUSTER_NODES).
#   Without --model the nodes serve rrt's default model (scripts/fetch-model.sh). A failed
#   start stops what it started and prints the logs' tails.
# stop: SIGTERM to the coordinator (open streams get coordinator.shutdown_seconds), then to the
#   nodes (they drain), SIGKILL to whatever still runs after --timeout seconds (default 45)
#   each, then checks that every process is gone and removes the pid files (logs stay).
# status: each process, running or not, and the coordinator's /ready; exit 0 only when all run.
#
# The binary: $RRT_BIN, else target/release/rrt of this repository. RRT_* variables of the
# environment (RRT_LOG, RRT_NODE__..., see rrt/src/config.rs) reach every process.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="${RRT_BIN:-$root/target/release/rrt}"
dir="${RRT_CLUSTER_DIR:-$root/.cache/local-cluster}"

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

# The start time of process $1 (field 22 of /proc/PID/stat), empty when there is no such process.
starttime() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  # The command name (field 2) may hold spaces: cut after its closing parenthesis.
  stat="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

# Whether the process recorded in pid file $1 still runs (a zombie counts as gone).
alive() {
  local pid start state
  read -r pid start < "$1" || return 1
  [ -n "$pid" ] && [ -e "/proc/$pid" ] || return 1
  [ "$(starttime "$pid")" = "$start" ] || return 1
  state="$(sed -e 's/^.*) //' "/proc/$pid/stat" 2> /dev/null | cut -d' ' -f1 || true)"
  [ -n "$state" ] && [ "$state" != "Z" ]
}

pid_of() {
  local pid _start
  read -r pid _start < "$1"
  echo "$pid"
}

# Starts "$@" in the background with its output in log $1 (shifted off) and records its pid in
# the pid file beside it.
launch() {
  local log="$1" pidfile="${1%.log}.pid" pid
  shift
  nohup "$@" < /dev/null > "$log" 2>&1 &
  pid=$!
  echo "$pid $(starttime "$pid")" > "$pidfile"
}

# Waits until log $1 has a line containing $2 and prints that line; fails when the process of
# its pid file exits first or after $3 seconds.
wait_for_line() {
  local log="$1" marker="$2" deadline=$((SECONDS + $3)) line
  while true; do
    line="$(grep -m1 -F -- "$marker" "$log" 2>/dev/null || true)"
    if [ -n "$line" ]; then
      echo "$line"
      return 0
    fi
    if ! alive "${log%.log}.pid"; then
      echo "cluster.sh: $(basename "${log%.log}") exited during start; last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "cluster.sh: no \"$marker\" in $log after $3 s; last lines:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

# The word after $2 in line $1 (up to a space or comma).
word_after() {
  local rest="${1#*"$2"}"
  [ "$rest" != "$1" ] || return 1
  rest="${rest%%[ ,]*}"
  echo "$rest"
}

# GET $1: prints "STATUS BODY" (STATUS 000 when nothing answers).
http_get() {
  if command -v curl > /dev/null; then
    local body code
    body="$(mktemp)"
    code="$(curl -s -o "$body" -w '%{http_code}' --max-time 5 "$1" || true)"
    echo "${code:-000} $(tr '\n' ' ' < "$body")"
    rm -f "$body"
  else
    python3 - "$1" << 'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status, r.read().decode(errors="replace").replace("\n", " "))
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace").replace("\n", " "))
except Exception:
    print("000")
PY
  fi
}

pidfiles() {
  local f
  for f in "$dir"/coordinator.pid "$dir"/node-*.pid; do
    if [ -e "$f" ]; then
      echo "$f"
    fi
  done
}

# SIGTERM to the processes of the given pid files, SIGKILL after $timeout s; prints one line
# per process.
terminate() {
  local f pid t0 deadline waiting
  local -a live=()
  for f in "$@"; do
    if alive "$f"; then
      kill -TERM "$(pid_of "$f")" 2> /dev/null || true
      live+=("$f")
    fi
  done
  if [ "${#live[@]}" -eq 0 ]; then
    return 0
  fi
  t0=$SECONDS
  deadline=$((SECONDS + timeout))
  while true; do
    waiting=0
    for f in "${live[@]}"; do
      if alive "$f"; then
        waiting=1
      fi
    done
    [ "$waiting" = 1 ] || break
    if [ "$SECONDS" -ge "$deadline" ]; then
      for f in "${live[@]}"; do
        if alive "$f"; then
          pid="$(pid_of "$f")"
          echo "cluster.sh: $(basename "${f%.pid}") (pid $pid) still runs ${timeout} s after SIGTERM: SIGKILL" >&2
          kill -KILL "$pid" 2> /dev/null || true
        fi
      done
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  for f in "${live[@]}"; do
    echo "stopped $(basename "${f%.pid}") (pid $(pid_of "$f")) after $((SECONDS - t0)) s"
  done
}

cmd_stop() {
  local f
  local -a node_files=() left=()
  if [ ! -d "$dir" ]; then
    echo "no cluster in $dir"
    return 0
  fi
  if [ -e "$dir/coordinator.pid" ]; then
    terminate "$dir/coordinator.pid"
  fi
  for f in "$dir"/node-*.pid; do
    if [ -e "$f" ]; then
      node_files+=("$f")
    fi
  done
  if [ "${#node_files[@]}" -gt 0 ]; then
    terminate "${node_files[@]}"
  fi
  while read -r f; do
    if alive "$f"; then
      left+=("$(basename "${f%.pid}") (pid $(pid_of "$f"))")
    fi
  done < <(pidfiles)
  if [ "${#left[@]}" -gt 0 ]; then
    die "still running after SIGKILL: ${left[*]}"
  fi
  while read -r f; do
    rm -f "$f"
  done < <(pidfiles)
  rm -f "$dir/cluster.env"
  echo "cluster in $dir stopped; logs kept there"
}

cmd_status() {
  local f all=0 any=0 n
  if [ ! -d "$dir" ]; then
    echo "no cluster in $dir"
    return 1
  fi
  while read -r f; do
    n="$(basename "${f%.pid}")"
    if alive "$f"; then
      echo "$n: running (pid $(pid_of "$f"))"
      any=1
    else
      echo "$n: not running (pid $(pid_of "$f"))"
      all=1
    fi
  done < <(pidfiles)
  if [ "$any" = 0 ]; then
    echo "no cluster running in $dir"
    return 1
  fi
  if [ -e "$dir/cluster.env" ]; then
    cat "$dir/cluster.env"
    # shellcheck disable=SC1091
    (. "$dir/cluster.env" && echo "ready: $(http_get "$RRT_CLUSTER_HTTP/ready")")
  fi
  return "$all"
}

# Port number $1 of the --base-port range, or 0 (the process picks a free one) without it.
port() {
  if [ -n "$base_port" ]; then
    echo $((base_port + $1))
  else
    echo 0
  fi
}

starting=0
on_exit() {
  if [ "$starting" = 1 ]; then
    starting=0
    echo "cluster.sh: start failed; stopping what it started (logs stay in $dir)" >&2
    timeout=10
    cmd_stop >&2 || true
  fi
}

cmd_start() {
  local i f line addr log grpc http ready deadline metrics_ok=0 joined
  local -a node_args coord_args common=() addrs=()
  [ -x "$bin" ] || die "no rrt binary at $bin: build it (cargo build --release -p rrt) or set RRT_BIN"
  mkdir -p "$dir"
  while read -r f; do
    if alive "$f"; then
      die "a cluster already runs in $dir ($(basename "${f%.pid}") pid $(pid_of "$f")): stop it first"
    fi
  done < <(pidfiles)
  rm -f "$dir"/*.pid "$dir"/*.log "$dir/cluster.env"
  if [ -n "$config" ]; then
    common+=(--config "$config")
  fi
  # node.metrics_listen (a node's Prometheus port, default 127.0.0.1:9301) would clash between
  # nodes on one machine: each node gets its own where this rrt has the key.
  if RRT_NODE__METRICS_LISTEN=127.0.0.1:0 "$bin" config "${common[@]}" > /dev/null 2>&1; then
    metrics_ok=1
  fi
  # Whatever ends this function early (a failed step under set -e, die) stops what it started.
  starting=1
  trap on_exit EXIT
  for ((i = 0; i < nodes; i++)); do
    node_args=(node --listen "127.0.0.1:$(port $((2 + i)))" --node-id "node-$i")
    if [ -n "$model" ]; then
      node_args+=(--model "$model")
    fi
    if [ -n "$kv_mib" ]; then
      node_args+=(--kv-mib "$kv_mib")
    fi
    node_args+=("${common[@]}")
    if [ "$metrics_ok" = 1 ]; then
      RRT_NODE__METRICS_LISTEN="127.0.0.1:$(port $((2 + nodes + i)))" launch "$dir/node-$i.log" "$bin" "${node_args[@]}"
    else
      launch "$dir/node-$i.log" "$bin" "${node_args[@]}"
    fi
  done
  for ((i = 0; i < nodes; i++)); do
    line="$(wait_for_line "$dir/node-$i.log" " listening on " "$start_timeout")"
    addr="$(word_after "$line" " listening on ")"
    addrs+=("$addr")
    echo "node-$i: $addr (pid $(pid_of "$dir/node-$i.pid"), log $dir/node-$i.log)"
  done
  joined="$(IFS=,; echo "${addrs[*]}")"
  coord_args=(coordinator --nodes "$joined" --grpc-listen "127.0.0.1:$(port 0)"
    --http-listen "127.0.0.1:$(port 1)")
  coord_args+=("${common[@]}")
  log="$dir/coordinator.log"
  launch "$log" "$bin" "${coord_args[@]}"
  line="$(wait_for_line "$log" "OpenAI HTTP on " "$start_timeout")"
  grpc="$(word_after "$line" "gRPC on ")"
  http="$(word_after "$line" "OpenAI HTTP on ")"
  deadline=$((SECONDS + start_timeout))
  while true; do
    ready="$(http_get "$http/ready")"
    # 200 "ready: N healthy nodes" once every node answers the coordinator's load polls.
    if [ "${ready%% *}" = 200 ] && [[ "$ready" == *"ready: $nodes healthy nodes"* ]]; then
      break
    fi
    if ! alive "$dir/coordinator.pid"; then
      tail -n 20 "$log" >&2
      die "the coordinator exited during start"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$log" >&2
      die "the coordinator is not ready with $nodes nodes after $start_timeout s: $ready"
    fi
    sleep 0.2
  done
  starting=0
  {
    echo "RRT_CLUSTER_HTTP=$http"
    echo "RRT_CLUSTER_GRPC=$grpc"
    echo "RRT_CLUSTER_NODES=$joined"
  } > "$dir/cluster.env"
  echo "coordinator: gRPC $grpc, OpenAI HTTP $http (pid $(pid_of "$dir/coordinator.pid"), log $log)"
  echo "ready: $nodes nodes; stop with: $0 stop --dir $dir"
  echo "try: curl $http/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 16}'"
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
action="$1"
shift
nodes=2 model="" base_port="" kv_mib="" config="" start_timeout=120 timeout=45
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes N}"; shift 2 ;;
    --model) model="${2:?--model PATH}"; shift 2 ;;
    --dir) dir="${2:?--dir RUNDIR}"; shift 2 ;;
    --base-port) base_port="${2:?--base-port P}"; shift 2 ;;
    --kv-mib) kv_mib="${2:?--kv-mib MIB}"; shift 2 ;;
    --config) config="${2:?--config FILE}"; shift 2 ;;
    --timeout) start_timeout="${2:?--timeout SECS}"; timeout="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]{0,2}$ ]] || die "--nodes must be a number in 1..999, got '$nodes'"
if [ -n "$base_port" ] && ! [[ "$base_port" =~ ^[0-9]+$ && "$base_port" -ge 1024 && $((base_port + 2 + 2 * nodes)) -le 65535 ]]; then
  die "--base-port must leave room for $((2 + 2 * nodes)) ports in 1024..65535, got '$base_port'"
fi
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$timeout'"
[ -z "$model" ] || [ -e "$model" ] || die "--model $model does not exist"

case "$action" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help | help) usage ;;
  *) usage >&2; die "unknown command: $action" ;;
esac
