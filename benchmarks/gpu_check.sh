#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): run from the repository root.
#
#   bash benchmarks/gpu_check.sh --out gpu_check.md   # on a GPU machine; at most ~8 minutes on one H200
#   bash benchmarks/gpu_check.sh --dry-run            # the same checks on the CPU at tiny shapes (CI runs it)
#
# The GPU machine has its own python3 with a CUDA build of PyTorch, transformers, numba, pandas and
# scipy, and no network. What the worker side needs beyond that (pydantic and its dependencies, the
# tokenizer files of the tiny/random text encoders) comes from .gpu_check/, which
# `bash benchmarks/gpu_bundle.sh` fills here (git-ignored; carry it to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -d .gpu_check/wheels ]] && ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    site=$(mktemp -d /tmp/itm-gpu-site-XXXX)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu_check/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -d .gpu_check/tokenizer ]]; then
    export ITM_TOKENIZER_DIR="$PWD/.gpu_check/tokenizer"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" -m benchmarks.gpu_check "$@"
