#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine, for trying cluster/submit.sh and for the tests:
# a head and WORKERS worker nodes, each its own `ray start --block` process with its own CPU count,
# ports and temp dir, all on this machine, with token authentication on (RAY_AUTH_MODE=token).
#
# The head offers no CPUs to tasks by default (HEAD_CPUS=0): trials land on the workers, as on a
# real cluster whose head only runs the driver. `up` writes $CLUSTER_DIR/cluster.env (the client
# settings and the node pids); `down` stops exactly those processes. Linux (setsid, ps -o sid).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: cluster/local.sh up|down|status
  env: WORKERS=2 WORKER_CPUS=1 HEAD_CPUS=0 GCS_PORT=6379 DASHBOARD_PORT=8265 PORT_BASE=23000
       CLUSTER_DIR=/tmp/itm-cluster-$UID OBJECT_STORE_BYTES=300000000 START_TIMEOUT=120 DRAIN_SECONDS=5
       RAY_AUTH_TOKEN=(generated into $CLUSTER_DIR/auth_token)
  then: . $CLUSTER_DIR/cluster.env && cluster/submit.sh studies/smoke.yaml --set ...
EOF
  exit 2
}

WORKERS=${WORKERS:-2}
WORKER_CPUS=${WORKER_CPUS:-1}
HEAD_CPUS=${HEAD_CPUS:-0}
GCS_PORT=${GCS_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
PORT_BASE=${PORT_BASE:-23000}  # node i: PORT_BASE+10*i .. +6 (raylet, object manager, agents, metrics, client)
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/itm-cluster-$(id -u)}  # short: Ray's unix sockets live below it
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-300000000}
STATE="$CLUSTER_DIR/cluster.env"
TOKEN_FILE="$CLUSTER_DIR/auth_token"
HERE=$(cd "$(dirname "$0")" && pwd)
RAY_BIN=${RAY_BIN:-$(command -v ray || echo "$HERE/../.venv/bin/ray")}
START_TIMEOUT=${START_TIMEOUT:-120}

die() { echo "local.sh: $*" >&2; exit 1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

alive() { kill -0 "$1" 2>/dev/null; }

# Environment of every node and every client of this cluster: token auth, token read from our file
# (never ~/.ray/auth_token, which other Ray instances on this machine would pick up).
# PATH starts with Ray's own bin dir so a job's `python` is the interpreter that runs Ray.
# A short drain on SIGTERM: nothing here serves traffic that needs to be moved away first.
NODE_ENV=(env -u RAY_ADDRESS -u RAY_AUTH_TOKEN RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
  RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${DRAIN_SECONDS:-5}"
  PATH="$(dirname "$RAY_BIN"):$PATH")

node_ports() {  # node index -> the ray start flags for its own ports
  local base=$((PORT_BASE + 10 * $1))
  echo "--node-manager-port=$base --object-manager-port=$((base + 1))" \
    "--dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3))" \
    "--runtime-env-agent-port=$((base + 4)) --metrics-export-port=$((base + 5))"
}

check_ports() {
  local ports=("$GCS_PORT" "$DASHBOARD_PORT") i k
  for ((i = 0; i <= WORKERS; i++)); do
    for k in 0 1 2 3 4 5 6; do ports+=($((PORT_BASE + 10 * i + k))); done
  done
  for i in "${ports[@]}"; do
    if port_in_use "$i"; then die "port $i is in use (another Ray?): set GCS_PORT, DASHBOARD_PORT or PORT_BASE"; fi
  done
}

# Start one node as its own session (setsid) so `down` can signal it and its children as a group.
# env and setsid exec, so $! is the pid of `ray start` itself. (Ray replaces a loopback
# --node-ip-address by this machine's address, so none is given: traffic stays on this machine.)
start_node() {  # name index ray-start-args...
  local name=$1 index=$2; shift 2
  mkdir -p "$CLUSTER_DIR/$name"
  # shellcheck disable=SC2046
  "${NODE_ENV[@]}" setsid "$RAY_BIN" start --block --num-gpus=0 --disable-usage-stats \
    --temp-dir="$CLUSTER_DIR/$name" --object-store-memory="$OBJECT_STORE_BYTES" $(node_ports "$index") "$@" \
    >"$CLUSTER_DIR/$name.log" 2>&1 </dev/null &
  echo "NODE_PIDS=\"\${NODE_PIDS:-} $!\"  # $name" >>"$STATE"
}

alive_nodes() {
  "${NODE_ENV[@]}" "$RAY_BIN" list nodes --address "http://127.0.0.1:$DASHBOARD_PORT" --filter state=ALIVE \
    --format yaml 2>/dev/null | grep -c 'node_id:' || true
}

wait_for_nodes() {  # expected count
  local deadline=$((SECONDS + START_TIMEOUT)) pid
  until [ "$(alive_nodes)" -ge "$1" ]; do
    # shellcheck disable=SC1090
    NODE_PIDS=""; . "$STATE"
    for pid in $NODE_PIDS; do
      alive "$pid" || { tail -n 20 "$CLUSTER_DIR"/*.log >&2; die "a ray start process ($pid) exited; logs in $CLUSTER_DIR"; }
    done
    [ "$SECONDS" -lt "$deadline" ] || die "$1 nodes not up after ${START_TIMEOUT}s; logs in $CLUSTER_DIR"
    sleep 1
  done
}

up() {
  if [ -f "$STATE" ]; then
    # shellcheck disable=SC1090
    NODE_PIDS=""; . "$STATE"
    for pid in $NODE_PIDS; do
      if alive "$pid"; then die "already up ($STATE); run 'cluster/local.sh down' first"; fi
    done
    rm -f "$STATE"
  fi
  check_ports
  mkdir -p "$CLUSTER_DIR"
  rm -f "$CLUSTER_DIR"/*.log
  (umask 077; if [ -n "${RAY_AUTH_TOKEN:-}" ]; then printf '%s' "$RAY_AUTH_TOKEN" >"$TOKEN_FILE"
   else od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE"; fi)  # 256 bits, as Ray's own generator
  cat >"$STATE" <<EOF
# Written by cluster/local.sh up. '. $STATE' points ray job submit / ray status at this cluster.
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
GCS_ADDRESS=127.0.0.1:$GCS_PORT
EOF
  trap 'echo "local.sh: start failed, stopping what was started" >&2; down' EXIT
  start_node head 0 --head --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port=$((PORT_BASE + 6))
  wait_for_nodes 1
  for ((i = 1; i <= WORKERS; i++)); do
    start_node "worker$i" "$i" --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS"
  done
  wait_for_nodes $((WORKERS + 1))
  trap - EXIT
  echo "up: head (${HEAD_CPUS} CPU) + $WORKERS workers (${WORKER_CPUS} CPU each), token auth on"
  echo "dashboard http://127.0.0.1:$DASHBOARD_PORT  gcs 127.0.0.1:$GCS_PORT  logs $CLUSTER_DIR"
  echo "use it:   . $STATE"
}

members() {  # node pids -> every process in their sessions (setsid) and all their descendants
  ps -eo pid=,ppid=,sid= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) node[r[i]] = 1 }
    { pid[NR] = $1; ppid[NR] = $2; if ($3 in node) mark[$1] = 1 }
    END {  # descendants: a job driver runs in a session of its own under the job supervisor
      do { grew = 0; for (i = 1; i <= NR; i++) if (!(pid[i] in mark) && (ppid[i] in mark)) { mark[pid[i]] = 1; grew = 1 } } while (grew)
      for (p in mark) print p
    }'
}

down() {
  [ -f "$STATE" ] || { echo "down: no cluster at $CLUSTER_DIR"; return 0; }
  # shellcheck disable=SC1090
  NODE_PIDS=""; . "$STATE"
  local pid deadline=$((SECONDS + 40)) order="" left
  for pid in $NODE_PIDS; do order="$pid $order"; done  # workers first, the head last
  # shellcheck disable=SC2086
  left=$(members $NODE_PIDS)
  # SIGTERM: `ray start --block` drains its node and stops the processes it started.
  for pid in $order; do if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi; done
  for pid in $order; do
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
  done
  sleep 1  # let workers notice their raylet is gone
  # Whatever outlived its node (a stuck worker, a job driver): SIGKILL by pid.
  for pid in $left; do if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi; done
  rm -f "$STATE" "$TOKEN_FILE"
  echo "down: stopped nodes$NODE_PIDS (logs kept in $CLUSTER_DIR)"
}

status() {
  [ -f "$STATE" ] || { echo "status: no cluster at $CLUSTER_DIR"; return 1; }
  # shellcheck disable=SC1090
  NODE_PIDS=""; . "$STATE"
  local pid
  for pid in $NODE_PIDS; do
    if alive "$pid"; then echo "node pid $pid: running"; else echo "node pid $pid: gone"; fi
  done
  "${NODE_ENV[@]}" "$RAY_BIN" status --address="$GCS_ADDRESS"
}

[ $# -eq 1 ] || usage
case "$1" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
