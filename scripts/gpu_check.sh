#!/usr/bin/env bash
# One command for the GPU path (docs/gpu.md): on one CUDA GPU, in under 8 minutes, it runs the CUDA tests, trains
# gpt2-124m and loop-81m in bf16 (eager and compiled) against the HF GPT-2 twin (tokens/s, MFU, peak memory),
# runs --parallel fsdp under torchrun, kills and resumes a run, generates and serves, and times the chunked loss
# at vocab 50,257. Figures: one JSON (runs/gpu_check/gpu_check.json); exit status 1 when a check failed.
#
#   bash scripts/gpu_check.sh                 # needs: pip install -e '.[hf,serve,dev]' and one CUDA GPU
#   bash scripts/gpu_check.sh --dry-run       # every check on the CPU with tiny models (minutes, not figures)
#
# Without a GPU (and without --dry-run) it says so in one line and exits 0, so CI can run it anywhere.
# Other arguments go to scripts/gpu_check.py (--json PATH, --work-dir DIR, --only CHECK,...).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The interpreter loopnn is installed in: the one setup.sh chose (scripts/env.sh: the active environment, or the
# project's .venv beside a system Python), else $PYTHON itself.
# shellcheck source=scripts/env.sh
source scripts/env.sh
[[ -x "$LOOPNN_PY" ]] || LOOPNN_PY=$BASE_PY
PYTHON=$LOOPNN_PY
dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry=1; done
if [[ $dry == 0 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no GPU: torch.cuda.is_available() is False; nothing checked (bash scripts/gpu_check.sh --dry-run runs the checks on CPU)"
    exit 0
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
