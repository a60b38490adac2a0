#!/usr/bin/env bash
# MLflow tracking server + UI over a study's sqlite store, on the machine that holds it (the head
# node on a cluster: only the driver writes to MLflow). Artifacts are served from the mlartifacts/
# directory beside the database, where the study engine writes them.
#
# Bound to 127.0.0.1 by default: MLflow has no authentication of its own. To reach it from your
# laptop use an SSH tunnel (ssh -L 5000:127.0.0.1:5000 head); to share it, put a reverse proxy with
# authentication and TLS in front of it (docs/cluster.md, "Watching a study").
set -euo pipefail

usage() {
  echo "usage: cluster/mlflow-server.sh [DB_FILE]   (default ./mlruns.db;" \
    "env: MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=5000 MLFLOW_WORKERS=2 ARTIFACT_ROOT=<db dir>/mlartifacts)" >&2
  exit 2
}
[ $# -le 1 ] || usage
case "${1:-}" in -h | --help) usage ;; esac

db=${1:-mlruns.db}
[ -f "$db" ] || { echo "mlflow-server.sh: no MLflow database at $db (run a study first or pass its path)" >&2; exit 2; }
db="$(cd "$(dirname "$db")" && pwd -P)/$(basename "$db")"  # absolute: a sqlite:/// path is relative to the cwd
artifacts=${ARTIFACT_ROOT:-$(dirname "$db")/mlartifacts}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
case "$host" in
  127.0.0.1 | localhost | ::1) ;;
  *) echo "mlflow-server.sh: warning: listening on $host without authentication; see docs/cluster.md" >&2 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
MLFLOW_BIN=${MLFLOW_BIN:-$(command -v mlflow || echo "$HERE/../.venv/bin/mlflow")}

# MLflow's server-side job runner (GenAI evaluation jobs) is off: a study needs none, and its huey
# worker processes outlive the server when it is stopped with SIGTERM.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "MLflow UI on http://$host:$port  (store sqlite:///$db, artifacts $artifacts)"
exec "$MLFLOW_BIN" server --backend-store-uri "sqlite:///$db" --artifacts-destination "$artifacts" \
  --serve-artifacts --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-2}"
