#!/usr/bin/env bash
# `make test-docker`: build the CPU image with a prebuilt tiny bundle and run the container tests
# (tests/deploy/test_container.py, tests/deploy/test_compose_up.py) against it.
#
#   1. a Docker engine: the one that answers, else dockerd started here (and stopped at the end);
#   2. the base image python:3.11-slim-bookworm: present, else the Debian stand-in
#      (deploy/docker/make-base-image.sh; no registry needed);
#   3. the tiny bundle artifacts/docker-tiny (`python -m model build --preset tiny`, seconds);
#   4. `docker build --build-arg RUNTIME=cpu --build-arg BUNDLE_DIR=artifacts/docker-tiny`;
#   5. pytest on the container tests, then removal of every container, network and volume they
#      made (labelled with this run's id), whatever happened.
#
# When Docker cannot run here (no engine and none can be started, not root, no debootstrap for the
# base image), it says why and exits 1 if CI is set, 0 ("skipped") otherwise.
#
# Environment: PY (default .venv/bin/python), DOCKER (default /usr/bin/docker when present: Debian's
# CLI has BuildKit built in, a newer `docker` earlier on PATH may lack buildx), TEXTGEN_TEST_IMAGE
# (default textgen:test-cpu), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker || echo docker); fi
fi
export DOCKER DOCKER_BUILDKIT=1
IMAGE=${TEXTGEN_TEST_IMAGE:-textgen:test-cpu}
BASE_IMAGE=python:3.11-slim-bookworm
BUNDLE=artifacts/docker-tiny
RUN_ID="run$(date +%s)$$"
STATE=$(mktemp -d /tmp/textgen-test-docker.XXXXXX)
started=$(date +%s)

say() { echo "test-docker: $*"; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

cannot() {
  if [ -n "${CI:-}" ]; then
    echo "test-docker: FAILED: Docker cannot run here: $*" >&2
    echo "test-docker: CI is set, so this is a failure, not a skip (.ci/run installs docker.io, docker-compose, debootstrap)" >&2
    exit 1
  fi
  say "SKIPPED: Docker cannot run here: $*"
  say "(set CI=true to make this a failure)"
  exit 0
}

cleanup() {
  local rc=$?
  # Whatever the tests left behind (a crash, a timeout): containers, then networks and volumes.
  if [ -n "${engine_up:-}" ]; then
    local project="tgtest${RUN_ID}" filter
    for filter in "label=textgen.test-run=$RUN_ID" "label=com.docker.compose.project=$project"; do
      "$DOCKER" ps -aq --filter "$filter" | xargs -r "$DOCKER" rm -f -v >/dev/null 2>&1 || true
    done
    filter="label=com.docker.compose.project=$project"
    "$DOCKER" network ls -q --filter "$filter" | xargs -r "$DOCKER" network rm >/dev/null 2>&1 || true
    "$DOCKER" volume ls -q --filter "$filter" | xargs -r "$DOCKER" volume rm >/dev/null 2>&1 || true
  fi
  deploy/docker/engine.sh stop "$STATE" || true
  rm -rf "$STATE"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. Engine.
command -v "$DOCKER" >/dev/null 2>&1 || cannot "no Docker CLI ($DOCKER; apt-get install docker.io)"
set +e
deploy/docker/engine.sh start "$STATE" 2>"$STATE/engine.err"
rc=$?
set -e
[ $rc -eq 0 ] || cannot "$(cat "$STATE/engine.err")"
engine_up=1

# 2. Base image.
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || cannot "$BASE_IMAGE is missing and debootstrap is not installed to make it (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || cannot "$BASE_IMAGE is missing and making it with debootstrap needs root"
  t=$(date +%s)
  DOCKER=$DOCKER deploy/docker/make-base-image.sh "$BASE_IMAGE"
  say "base image made in $(elapsed "$t")"
fi
# An engine that answers may still be unable to run containers (no cgroups, no overlay, no
# network namespaces in a sandbox): find out before the build.
if ! out=$(timeout 120 "$DOCKER" run --rm --label "textgen.test-run=$RUN_ID" "$BASE_IMAGE" true 2>&1); then
  cannot "the engine answers but cannot run a container: $out"
fi

# 3. Bundle (built again when the model code changed since).
if [ -f "$BUNDLE/config.json" ] && [ -n "$(find model -name '*.py' -newer "$BUNDLE/config.json" -print -quit)" ]; then
  say "model/ changed since $BUNDLE was built: building it again"
  rm -rf "$BUNDLE"
fi
if [ ! -f "$BUNDLE/config.json" ]; then
  t=$(date +%s)
  say "building the tiny bundle $BUNDLE"
  "$PY" -m model build --preset tiny --out "$BUNDLE" >"$STATE/bundle.log" 2>&1 \
    || { tail -n 30 "$STATE/bundle.log" >&2; exit 1; }
  say "bundle built in $(elapsed "$t")"
fi

# 4. Image.
t=$(date +%s)
say "building $IMAGE (RUNTIME=cpu, BUNDLE_DIR=$BUNDLE; log: $STATE/build.log)"
if ! timeout 1800 "$DOCKER" build --progress=plain --build-arg RUNTIME=cpu --build-arg BUNDLE_SOURCE=prebuilt \
    --build-arg BUNDLE_DIR="$BUNDLE" --label textgen.test-image=1 -t "$IMAGE" . >"$STATE/build.log" 2>&1; then
  tail -n 60 "$STATE/build.log" >&2
  echo "test-docker: docker build failed" >&2
  exit 1
fi
# The image this one replaced, now untagged (the build cache is kept: the next build stays warm).
"$DOCKER" image prune -f --filter label=textgen.test-image=1 >/dev/null
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
say "image $IMAGE built in $(elapsed "$t"): $(( size / 1000000 )) MB"

# 5. Tests.
t=$(date +%s)
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
TEXTGEN_TEST_IMAGE=$IMAGE TEXTGEN_TEST_BUNDLE=$BUNDLE TEXTGEN_TEST_RUN=$RUN_ID \
  timeout 2400 "$PY" -m pytest -q -p no:cacheprovider tests/deploy/test_container.py tests/deploy/test_compose_up.py ${PYTEST_ARGS:-}
say "container tests passed in $(elapsed "$t"); make test-docker took $(elapsed "$started")"
