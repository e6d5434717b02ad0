"""scripts/setup.sh picks where loopnn is installed: the active virtual environment, else a project-local .venv
(a system Python that refuses pip under PEP 668 is never installed into). `--plan` prints the choice and installs
nothing, so these tests are cheap; the real installs are recorded in the issue that asked for them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the setup scripts are bash")


def fake_system_python(tmp_path: Path, managed: bool = True) -> Path:
    """A wrapper around this interpreter that looks like an OS Python: no virtual environment, and (managed) an
    EXTERNALLY-MANAGED marker in its stdlib folder, the file pip checks before refusing to install (PEP 668)."""
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    if managed:
        (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use a virtual environment\n")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys, sysconfig\n"
        "sys.base_prefix = sys.prefix\n"
        "_get = sysconfig.get_path\n"
        f"sysconfig.get_path = lambda name, *a, **k: {str(stdlib)!r} if name == 'stdlib' else _get(name, *a, **k)\n"
    )
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={hook} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


def plan(python: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("LOOPNN_VENV", "TORCH_SPEC")}
    environ |= {"PYTHON": str(python), **env}
    out = subprocess.run(["bash", str(SETUP), "--plan"], capture_output=True, text=True, timeout=60, env=environ)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def not_conda():
    if (Path(sys.prefix) / "conda-meta").is_dir():
        pytest.skip("this interpreter is a conda environment; the fake system Python would read as one")


def test_externally_managed_python_gets_a_project_venv(tmp_path, not_conda):
    python = fake_system_python(tmp_path)
    venv = tmp_path / "proj-venv"
    out = plan(python, LOOPNN_VENV=str(venv))
    assert "externally managed (PEP 668)" in out
    assert f"environment: {venv} (to create with {python} -m venv)" in out
    assert f"run with {venv}/bin/python" in out
    # demo.sh and test.sh source the same choice, so they run from the new environment without activating it
    probe = "source scripts/env.sh && echo $LOOPNN_PY"
    env = {**os.environ, "PYTHON": str(python), "LOOPNN_VENV": str(venv)}
    got = subprocess.run(["bash", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert got.stdout.strip() == f"{venv}/bin/python", got.stderr


def test_plain_base_python_also_gets_the_venv_unless_told_otherwise(tmp_path, not_conda):
    python = fake_system_python(tmp_path, managed=False)
    venv = tmp_path / "v"
    assert f"environment: {venv} (to create" in plan(python, LOOPNN_VENV=str(venv))
    assert f"environment: {python} (installs into it)" in plan(python, LOOPNN_VENV="none")


def test_an_active_virtual_environment_is_used_and_the_torch_pin_applies(tmp_path):
    """A venv without pip (as `uv venv` makes) is used as it is; the pinned torch (or TORCH_SPEC) is planned
    because this venv cannot import torch."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    out = plan(python)
    assert f"environment: {python} (installs into it)" in out and "virtual environment" in out
    assert "torch: install torch==2.13.0" in out
    assert "torch: install torch==9.9" in plan(python, TORCH_SPEC="torch==9.9")


def test_a_missing_python_is_one_line(tmp_path):
    env = {**os.environ, "PYTHON": str(tmp_path / "nope")}
    out = subprocess.run(["bash", str(SETUP), "--plan"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "no Python found" in out.stderr and len(out.stderr.splitlines()) == 1
