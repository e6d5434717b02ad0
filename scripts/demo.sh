#!/usr/bin/env bash
# Set up and run the demo: the paper's comparison at laptop scale (its measured time on 2 CPU cores: docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
"$LOOPNN_PY" -m loopnn demo "$@"
