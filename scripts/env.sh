# Sourced by setup.sh, demo.sh and test.sh: picks the Python environment loopnn lives in, so the README's two
# commands need nothing activated. $PYTHON (default python3) inside a virtual or conda environment: that
# environment. Otherwise (a system Python, which may refuse pip under PEP 668, or any other base interpreter):
# the project-local $LOOPNN_VENV (default .venv), which setup.sh creates. LOOPNN_VENV=none installs into $PYTHON.
# Sets BASE_PY, BASE_KIND (venv | conda | system), BASE_MANAGED (1: PEP 668 EXTERNALLY-MANAGED), VENV_DIR, LOOPNN_PY.
BASE_PY=${PYTHON:-python3}
VENV_DIR=${LOOPNN_VENV:-.venv}
if ! command -v "$BASE_PY" >/dev/null 2>&1; then
    echo "setup: error: no Python found at '$BASE_PY'; install Python 3.11+ or set PYTHON=/path/to/python3" >&2
    exit 2
fi
_probe=$("$BASE_PY" - <<'PY'
import os, sys, sysconfig
if sys.version_info < (3, 11):
    print(f"old {sys.version.split()[0]}")
    raise SystemExit
kind = "venv" if sys.prefix != sys.base_prefix else "conda" if os.path.isdir(os.path.join(sys.prefix, "conda-meta")) else "system"
managed = os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
print(kind, int(managed))
PY
) || { echo "setup: error: '$BASE_PY' does not run; set PYTHON=/path/to/python3 (3.11+)" >&2; exit 2; }
read -r BASE_KIND BASE_MANAGED <<<"$_probe"
if [ "$BASE_KIND" = old ]; then
    echo "setup: error: '$BASE_PY' is Python $BASE_MANAGED; loopnn needs 3.11+: set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
if [ "$BASE_KIND" != system ] || [ "$VENV_DIR" = none ]; then
    LOOPNN_PY=$BASE_PY
else
    LOOPNN_PY=$VENV_DIR/bin/python
fi
