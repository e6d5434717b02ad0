#!/usr/bin/env bash
# Set up and run the test suite (CPU, offline, a few minutes on 2 cores). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$LOOPNN_PY" -m pytest -q "$@"
