"""Helpers for the tests that build and run real containers (``make test-docker``).

They run against an image that ``deploy/docker/test-docker.sh`` built, named by the environment
variable ``TEXTGEN_TEST_IMAGE``; without it (a plain ``make test``) those test modules skip with a
pointer to ``make test-docker``. Every container is published on an ephemeral loopback port only
(``127.0.0.1::8000``), carries the label ``textgen.test-run=<TEXTGEN_TEST_RUN>`` so that the
script can remove whatever a crashed test left behind, and is removed by the test that made it.
Waiting is polling with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from deploytools import missing

T = TypeVar("T")

RUN_ID = os.environ.get("TEXTGEN_TEST_RUN") or f"pytest-{uuid.uuid4().hex[:8]}"
LABEL = f"textgen.test-run={RUN_ID}"
UID = 10001  # the image's USER

# How docker-compose.yml runs the service: read-only root, the two writable paths on tmpfs (the
# metrics folder owned by the service's user), no capabilities, no privilege escalation.
HARDENING = [
    "--read-only",
    "--tmpfs", "/tmp",
    "--tmpfs", f"/run/textgen/metrics:uid={UID},gid={UID},mode=0700",
    "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges:true",
]  # fmt: skip


def image_under_test() -> str:
    """The image under test, or skip the calling module (a plain `make test` builds no image)."""
    image = os.environ.get("TEXTGEN_TEST_IMAGE")
    if not image:
        pytest.skip(
            "container tests run under `make test-docker`, which builds the image (TEXTGEN_TEST_IMAGE unset)",
            allow_module_level=True,
        )
    return image


def docker_cli() -> str:
    """The Docker CLI: $DOCKER, else Debian's /usr/bin/docker (BuildKit built in), else `docker`."""
    for candidate in (os.environ.get("DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    missing("`docker`", "apt-get install docker.io")
    raise AssertionError("unreachable")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"$ docker {' '.join(args)}\nexit {proc.returncode}\n{proc.stderr}{proc.stdout}")
    return proc


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """Call `probe` until it returns something other than None/False; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Container:
    id: str
    name: str

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.id).stdout)[0]

    def state(self) -> dict:
        return self.inspect()["State"]

    def logs(self) -> str:
        proc = docker("logs", self.id, check=False)
        return proc.stdout + proc.stderr

    def url(self, port: int = 8000) -> str:
        """http://127.0.0.1:<ephemeral> that Docker published for the container's `port`."""
        out = docker("port", self.id, f"{port}/tcp").stdout.split()
        (hostport,) = [x for x in out if x.startswith("127.0.0.1:")]
        return f"http://{hostport}"

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return docker("exec", self.id, *cmd, timeout=timeout, check=False)

    def wait_healthy(self, timeout: float = 240) -> None:
        """Until Docker's own health check (the image's HEALTHCHECK) reports `healthy`."""

        def healthy() -> bool:
            state = self.state()
            if not state["Running"]:
                raise AssertionError(f"container exited ({state['ExitCode']}):\n{self.logs()[-3000:]}")
            return state["Health"]["Status"] == "healthy"

        try:
            wait_for(f"{self.name} to turn healthy", healthy, timeout, every=1.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlogs:\n{self.logs()[-3000:]}") from None

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the container has stopped by itself."""
        return wait_for(
            f"{self.name} to exit", lambda: (s := self.state())["Running"] is False and s, timeout
        )["ExitCode"]

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.id, check=False, timeout=60)


def start(
    image: str,
    *,
    env: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    hardened: bool = True,
) -> Container:
    """`docker run -d` the image on an ephemeral loopback port, hardened as compose runs it."""
    name = f"textgen-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    args = ["run", "-d", "--name", name, "--label", LABEL, "-p", "127.0.0.1::8000"]
    args += ["-e", "TEXTGEN_PROVIDER=cpu"]
    if hardened:
        args += HARDENING
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    for volume in volumes:
        args += ["-v", volume]
    cid = docker(*args, *extra, image).stdout.strip()
    return Container(cid, name)
