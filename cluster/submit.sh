#!/usr/bin/env bash
# Submit a study to a running Ray cluster as a Ray Job: the repo is uploaded as the job's working
# directory (cluster/runtime_env.yaml says what stays behind) and `python -m study run` drives the
# search from the head node. Waits and streams the job's log; exits non-zero if the job fails.
#
#   RAY_ADDRESS          the cluster's dashboard / job server (default http://127.0.0.1:8265)
#   RAY_AUTH_TOKEN       the cluster's token, or RAY_AUTH_TOKEN_PATH a file holding it
#                        (`. $CLUSTER_DIR/cluster.env` after cluster/local.sh up sets all three)
#   SUBMIT_ARGS          extra `ray job submit` flags, e.g. "--no-wait --submission-id dias-1"
set -euo pipefail

usage() {
  echo "usage: cluster/submit.sh STUDY.yaml [--set section.key=value ...]" >&2
  echo "       cluster/submit.sh resume STUDY_DIR      (continue an interrupted study as a job)" >&2
  echo "       cluster/submit.sh -- COMMAND ...        (any other command, e.g. python -m study ablate ...)" >&2
  exit 2
}
[ $# -ge 1 ] || usage
case "$1" in -h | --help) usage ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)  # the working dir uploaded to the cluster
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
# Pass the token through: a Ray client presents it only when RAY_AUTH_MODE=token.
if [ -n "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]; then export RAY_AUTH_MODE=token; fi
RAY_BIN=${RAY_BIN:-$(command -v ray || echo "$ROOT/.venv/bin/ray")}
# cluster/runtime_env.yaml lists every exclude; the repo's .gitignore ("data/") would also drop
# the trainables/data/ package from the upload.
export RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1

if [ "$1" = -- ]; then
  shift
  [ $# -ge 1 ] || usage
  command=("$@")
elif [ "$1" = resume ]; then
  [ $# -eq 2 ] || usage
  case "$2" in /*) ;; *) echo "submit.sh: STUDY_DIR must be an absolute path on shared storage, got '$2'" >&2; exit 2 ;; esac
  command=(python -m study resume "$2")
else
  given=$1; shift
  [ -f "$given" ] || { echo "submit.sh: study file not found: $given" >&2; exit 2; }
  abs="$(cd "$(dirname "$given")" && pwd -P)/$(basename "$given")"
  case "$abs" in
    "$ROOT"/*) study=${abs#"$ROOT"/} ;;  # the job sees the repo as its working dir
    *) echo "submit.sh: $given is outside $ROOT; the job only sees files in the repo" >&2; exit 2 ;;
  esac
  command=(python -m study run "$study" "$@")
fi

cd "$ROOT"
# shellcheck disable=SC2086  # SUBMIT_ARGS is a list of flags
exec "$RAY_BIN" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml \
  ${SUBMIT_ARGS:-} -- "${command[@]}"
