#!/usr/bin/env bash
# Install loopnn and its test/HF extras into the current Python environment.
# torch: kept if already importable (e.g. your CUDA build); otherwise the pinned CPU-tested release is
# installed first, so an open-ended requirement never pulls a multi-GB CUDA build onto a CPU machine.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
# LOOPNN_EXTRAS=dev,hf,serve,data adds HF `datasets` (hub corpora, parquet): ~30 s and ~270-400 MB more (pyarrow,
# pandas). serve: starlette + uvicorn for `loopnn serve` (its tests also need dev's openai client).
EXTRAS=${LOOPNN_EXTRAS:-dev,hf,serve}
echo "setup: installing loopnn[$EXTRAS]"
"$PY" -m pip install -q -e ".[$EXTRAS]"
"$PY" -c "import loopnn, torch; print(f'setup: loopnn {loopnn.__version__}, torch {torch.__version__}')"
