#!/usr/bin/env bash
# Set up and run the demo: a looped block against its one-block base at laptop scale (its time on 2 CPU cores:
# docs/results.md). Arguments go to `loopnn demo` (--lm: language modelling, --full: the 70-minute comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
"$LOOPNN_PY" -m loopnn demo "$@"
