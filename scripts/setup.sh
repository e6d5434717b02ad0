#!/usr/bin/env bash
# Install loopnn and its test/HF extras, editable, into the environment scripts/env.sh picks: the active virtual or
# conda environment, else a project-local .venv (created here; a system Python that refuses pip under PEP 668 is
# never installed into). Environments without pip (a `uv venv`) get it from ensurepip, or use `uv pip`.
# torch: kept if already importable (e.g. your CUDA build; a new .venv sees the base Python's packages when that
# Python has torch); otherwise the pinned CPU-tested release is installed first, so an open-ended requirement never
# pulls a multi-GB CUDA build onto a CPU machine. Override with TORCH_SPEC (e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"). `--plan` prints the plan and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
export PIP_DISABLE_PIP_VERSION_CHECK=1
# LOOPNN_EXTRAS=dev,hf,serve,data adds HF `datasets` (hub corpora, parquet): ~30 s and ~270-400 MB more (pyarrow,
# pandas). serve: starlette + uvicorn for `loopnn serve` (its tests also need dev's openai client).
EXTRAS=${LOOPNN_EXTRAS:-dev,hf,serve}
TORCH=${TORCH_SPEC:-torch==2.13.0}

has() { "$1" -c "import $2" >/dev/null 2>&1; }
describe_base() {
    case $BASE_KIND in
        venv) echo "virtual environment" ;;
        conda) echo "conda environment" ;;
        *) [ "$BASE_MANAGED" = 1 ] && echo "system Python, externally managed (PEP 668)" || echo "not in a virtual environment" ;;
    esac
}

if [ "${1:-}" = --plan ]; then
    echo "setup: python: $BASE_PY ($(describe_base))"
    if [ "$LOOPNN_PY" = "$BASE_PY" ]; then
        echo "setup: environment: $BASE_PY (installs into it)"
    elif [ -x "$LOOPNN_PY" ]; then
        echo "setup: environment: $VENV_DIR (exists; reused)"
    else
        echo "setup: environment: $VENV_DIR (to create with $BASE_PY -m venv)"
    fi
    if [ -x "$LOOPNN_PY" ] && has "$LOOPNN_PY" torch; then
        echo "setup: torch: already importable, kept"
    elif [ "$LOOPNN_PY" != "$BASE_PY" ] && has "$BASE_PY" torch; then
        echo "setup: torch: the base Python's, seen from the new environment (--system-site-packages), kept"
    else
        echo "setup: torch: install $TORCH"
    fi
    echo "setup: then: install loopnn[$EXTRAS] (editable); run with $LOOPNN_PY"
    exit 0
fi

if [ "$LOOPNN_PY" != "$BASE_PY" ] && [ ! -x "$LOOPNN_PY" ]; then
    echo "setup: $BASE_PY is $(describe_base): creating $VENV_DIR (the README's commands use it; nothing to activate)"
    venv_flag=""
    if has "$BASE_PY" torch; then venv_flag=--system-site-packages; fi  # keep the base Python's torch build
    # shellcheck disable=SC2086
    if ! "$BASE_PY" -m venv $venv_flag "$VENV_DIR" >/dev/null 2>&1; then
        rm -rf "$VENV_DIR"
        if command -v uv >/dev/null 2>&1; then
            # shellcheck disable=SC2086
            uv venv -q $venv_flag --python "$BASE_PY" "$VENV_DIR"
        else
            echo "setup: error: $BASE_PY cannot create a virtual environment (no venv/ensurepip module); install" \
                "your OS's venv package (Debian/Ubuntu: apt install python3-venv) or uv, or set PYTHON" >&2
            exit 2
        fi
    fi
fi

# The installer: pip in the environment, else pip from ensurepip, else uv's pip.
if "$LOOPNN_PY" -m pip --version >/dev/null 2>&1 || "$LOOPNN_PY" -m ensurepip >/dev/null 2>&1; then
    pip_install() { "$LOOPNN_PY" -m pip install -q "$@"; }
elif command -v uv >/dev/null 2>&1; then
    pip_install() { uv pip install -q --python "$LOOPNN_PY" "$@"; }
else
    echo "setup: error: $LOOPNN_PY has no pip and ensurepip cannot add it; install uv, or pip into that" \
        "environment, then run setup again" >&2
    exit 2
fi

if ! has "$LOOPNN_PY" torch; then
    echo "setup: installing $TORCH"
    # shellcheck disable=SC2086
    pip_install $TORCH
fi
echo "setup: installing loopnn[$EXTRAS] into $("$LOOPNN_PY" -c 'import sys; print(sys.prefix)')"
pip_install -e ".[$EXTRAS]"
"$LOOPNN_PY" -c "import loopnn, torch; print(f'setup: loopnn {loopnn.__version__}, torch {torch.__version__}')"
