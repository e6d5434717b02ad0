#!/usr/bin/env bash
# Set up and run the demo: the paper's comparison at laptop scale (about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
loopnn demo "$@"
