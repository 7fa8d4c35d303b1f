"""The Dockerfile: hadolint clean (every ignored rule justified next to it) and the serving contract."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploytools import REPO, describe, require_tool, run

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Instruction:
    line: int  # 1-based line of the instruction keyword
    keyword: str  # upper case
    args: str  # continuation lines joined, comments inside dropped
    stage: str  # name (or index) of the stage it belongs to


def parse(text: str) -> list[Instruction]:
    """A small Dockerfile reader: enough for checks, not a full parser."""
    out: list[Instruction] = []
    stage = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i].strip()
        start = i
        i += 1
        if not raw or raw.startswith("#"):
            continue
        parts = [raw]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            nxt = lines[i].strip()
            i += 1
            if not nxt.startswith("#"):
                parts.append(nxt)
        keyword, _, args = " ".join(parts).partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = m.group(1) if m else f"stage{sum(1 for x in out if x.keyword == 'FROM')}"
        out.append(Instruction(start + 1, keyword, args.strip(), stage))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = [x for x in instructions if x.keyword == "FROM"][-1].stage
    return [x for x in instructions if x.stage == last]


def test_hadolint_reports_nothing():
    hadolint = require_tool("hadolint")
    proc = run([hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)])
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "hadolint findings:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings
    )
    assert proc.returncode == 0, describe(proc)


def test_every_hadolint_ignore_is_justified():
    """Each `# hadolint ignore=X,Y` has, in the comment block just above it, a `X: why` line per rule."""
    lines = DOCKERFILE.read_text().splitlines()
    assert not any("hadolint global" in line for line in lines), "no file-wide ignores: justify each RUN"
    ignores = [(i, line) for i, line in enumerate(lines) if re.match(r"\s*#\s*hadolint\s+ignore=", line)]
    for i, line in ignores:
        codes = re.search(r"ignore=([\w,]+)", line).group(1).split(",")
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j])
            j -= 1
        comment = "\n".join(block)
        for code in codes:
            assert re.search(rf"\b{code}:\s*\S", comment), (
                f"Dockerfile line {i + 1} ignores {code} without a `# {code}: reason` comment above it"
            )
    assert not (REPO / ".hadolint.yaml").exists() and not (REPO / ".hadolint.yml").exists(), (
        "ignore rules inline, next to the instruction, with the reason"
    )


def test_base_images(instructions: list[Instruction]):
    args = {
        m.group(1): m.group(2)
        for x in instructions
        if x.keyword == "ARG"
        for m in [re.match(r"(\w+)=(\S+)", x.args)]
        if m
    }
    cuda = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", cuda), cuda
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim"), args["PYTHON_IMAGE"]
    assert args["RUNTIME"] == "cuda"
    assert args["BUNDLE_SOURCE"] == "prebuilt", "no training in a default `docker build`"
    froms = {x.stage: x.args.split()[0] for x in instructions if x.keyword == "FROM"}
    assert froms["runtime-cuda"] == "${CUDA_IMAGE}"
    assert froms["runtime-cpu"] == "${PYTHON_IMAGE}"
    assert froms["bundle-build"] == "${PYTHON_IMAGE}"
    assert froms["bundle"] == "bundle-${BUNDLE_SOURCE}"
    assert list(froms)[-1] == "serve" and froms["serve"] == "runtime-${RUNTIME}"


def test_bundle_is_built_with_cpu_torch(instructions: list[Instruction]):
    build = [x for x in instructions if x.stage == "bundle-build"]
    runs = " ".join(x.args for x in build if x.keyword == "RUN")
    assert "download.pytorch.org/whl/cpu" in " ".join(x.args for x in build if x.keyword == "ARG")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert "python -m model build --preset" in runs and "--out /bundle" in runs
    prebuilt = [x for x in instructions if x.stage == "bundle-prebuilt"]
    assert any(x.keyword == "COPY" and x.args.startswith("${BUNDLE_DIR}") for x in prebuilt)


def test_serving_image_contract(final_stage: list[Instruction]):
    by_kw: dict[str, list[str]] = {}
    for x in final_stage:
        by_kw.setdefault(x.keyword, []).append(x.args)
    assert by_kw["EXPOSE"] == ["8000"]
    assert by_kw["STOPSIGNAL"] == ["SIGTERM"]
    (user,) = by_kw["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER must be a numeric non-root id (runAsNonRoot checks it), got {user}"
    )
    (healthcheck,) = by_kw["HEALTHCHECK"]
    assert "/health" in healthcheck and "urllib" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    (entrypoint,) = by_kw["ENTRYPOINT"]
    assert json.loads(entrypoint)[-3:] == ["python", "-m", "service"]
    env = " ".join(by_kw["ENV"])
    for name, value in {
        "TEXTGEN_MODEL_DIR": "/opt/textgen/model",
        "TEXTGEN_HOST": "0.0.0.0",
        "TEXTGEN_HTTP_PORT": "8000",
        "TEXTGEN_DRAIN_TIMEOUT_S": "30",
        "PROMETHEUS_MULTIPROC_DIR": "/run/textgen/metrics",
    }.items():
        assert f"{name}={value}" in env, f"ENV {name}={value} missing"
    runs = " ".join(by_kw["RUN"])
    assert "install -d -o 10001" in runs and "/run/textgen/metrics" in runs
    assert any("/opt/textgen/model" in c for c in by_kw["COPY"])


def test_serving_stages_install_no_torch_and_keep_no_pip_cache(instructions: list[Instruction]):
    serving_stages = ("requirements", "wheel", "runtime-cuda", "runtime-cpu", "serve")
    serving = [x for x in instructions if x.stage in serving_stages]
    for x in serving:
        assert "torch" not in x.args, f"line {x.line}: the serving image must not install torch"
    for x in instructions:
        if x.keyword == "RUN" and re.search(r"\bpip (install|wheel)\b", x.args):
            assert "--no-cache-dir" in x.args, f"line {x.line}: pip without --no-cache-dir"


def test_no_secrets_and_no_kubernetes_colliding_names(instructions: list[Instruction]):
    for x in instructions:
        if x.keyword in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + x.args)
            for name in names:
                assert not re.search(r"KEY|PASSWORD|SECRET|TOKEN", name), (
                    f"line {x.line}: {name} looks like a secret"
                )
                assert name != "TEXTGEN_PORT" and not name.endswith("_SERVICE_HOST"), f"line {x.line}: {name}"


def test_dockerignore_is_an_allow_list():
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "**", "start from excluding everything"
    for needed in (
        "!pyproject.toml",
        "!README.md",
        "!model/",
        "!service/",
        "!bundle/",
        "!artifacts/*/*.onnx",
        "!artifacts/*/*.json",
        "!artifacts/*/*.model",
    ):
        assert needed in patterns
    for dropped in ("**/__pycache__", "**/*.pyc"):
        assert dropped in patterns
    # Docker 20.10's BuildKit does not look below a folder that `**` excluded for re-included files:
    # the bundle folders themselves are re-included, then emptied, before their files.
    order = [patterns.index(p) for p in ("!artifacts/*/", "artifacts/*/*", "!artifacts/*/*.onnx")]
    assert order == sorted(order), patterns


def test_dockerignore_lets_every_bundle_file_in(tiny_bundle: Path):
    """Each file a built bundle lists in config.json reaches a prebuilt image (the loader checks them all)."""
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    files = [*json.loads((tiny_bundle / "config.json").read_text())["files"], "config.json"]
    for name in files:
        path = f"artifacts/{tiny_bundle.name}/{name}"
        included = True  # Docker's rule: the last pattern that matches decides
        for pattern in patterns:
            if fnmatch.fnmatchcase(path, pattern.removeprefix("!").rstrip("/")):
                included = pattern.startswith("!")
        assert included, f"{name} of the bundle is excluded from the build context by .dockerignore"


def test_no_frontend_image_to_pull():
    """A `# syntax=` line makes BuildKit pull a frontend image: offline builds fail."""
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), first


def test_runtime_picks_its_onnxruntime_from_the_pyproject_extras(instructions: list[Instruction]):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any(d.startswith("onnxruntime") for d in project["dependencies"]), "one ORT build, via extras"
    assert [d.split("==")[0] for d in extras["cpu"]] == ["onnxruntime"]
    assert [d.split("==")[0] for d in extras["gpu"]] == ["onnxruntime-gpu"]
    assert extras["cpu"][0].split("==")[1] == extras["gpu"][0].split("==")[1], "the same ORT version"
    req = [x for x in instructions if x.stage == "requirements"]
    assert [x.args for x in req if x.keyword == "COPY"] == ["pyproject.toml ./"], "code edits keep the cache"
    runs = " ".join(x.args for x in req if x.keyword == "RUN")
    assert "cpu:cpu cuda:gpu" in runs and "optional-dependencies" in runs
    serve_runs = " ".join(x.args for x in instructions if x.stage == "serve" and x.keyword == "RUN")
    assert "from=requirements" in serve_runs and "requirements-${RUNTIME}.txt" in serve_runs


def test_copy_sources_are_in_the_build_context(instructions: list[Instruction]):
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    # what the allow-list lets in by name, and the bundle folder (its files: test_dockerignore_lets_every_bundle_file_in)
    allowed = {p[1:] for p in patterns if p.startswith("!") and "*" not in p} | {"${BUNDLE_DIR}/"}
    for x in instructions:
        if x.keyword == "COPY" and "--from=" not in x.args:
            sources = x.args.split()[:-1]
            for source in sources:
                assert source.rstrip("/") in {a.rstrip("/") for a in allowed}, (
                    f"line {x.line}: COPY {source} is excluded by .dockerignore (allow it there)"
                )
