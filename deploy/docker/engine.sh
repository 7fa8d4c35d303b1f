#!/usr/bin/env bash
# Start a Docker engine if none answers, or stop the one this script started.
#
#   deploy/docker/engine.sh start STATE_DIR   # exit 0: an engine answers (STATE_DIR/dockerd.pid if we started it)
#   deploy/docker/engine.sh stop STATE_DIR    # stops the engine only if STATE_DIR/dockerd.pid says we started it
#
# DOCKER (default /usr/bin/docker) is the CLI to probe with; DOCKERD (default: dockerd on PATH).
# Exit status 3 from `start` means "Docker cannot run here" (no dockerd, not root, or it did not
# come up); the message on stderr says why.
set -euo pipefail
action=${1:?usage: engine.sh start|stop STATE_DIR}
state=${2:?usage: engine.sh start|stop STATE_DIR}
DOCKER=${DOCKER:-/usr/bin/docker}
mkdir -p "$state"
pidfile="$state/dockerd.pid"

answers() { timeout 10 "$DOCKER" info >/dev/null 2>&1; }

case "$action" in
start)
  [ -x "$DOCKER" ] || { echo "cannot run Docker: $DOCKER not found (apt-get install docker.io)" >&2; exit 3; }
  if answers; then
    echo "docker engine: already running"
    exit 0
  fi
  dockerd=${DOCKERD:-$(command -v dockerd || true)}
  [ -n "$dockerd" ] || { echo "cannot run Docker: no engine answers and dockerd is not installed (apt-get install docker.io)" >&2; exit 3; }
  [ "$(id -u)" = 0 ] || { echo "cannot run Docker: no engine answers and starting dockerd needs root" >&2; exit 3; }
  echo "docker engine: starting $dockerd (log: $state/dockerd.log)"
  # setsid: its own session, so a Ctrl-C meant for the tests does not kill the engine under them;
  # `engine.sh stop` (the caller's exit trap) stops it.
  setsid "$dockerd" >"$state/dockerd.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  deadline=$(( $(date +%s) + 60 ))
  until answers; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      rm -f "$pidfile"
      echo "cannot run Docker: dockerd exited at start-up; last lines of its log:" >&2
      tail -n 15 "$state/dockerd.log" >&2
      exit 3
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "cannot run Docker: dockerd did not answer within 60 s; last lines of its log:" >&2
      tail -n 15 "$state/dockerd.log" >&2
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
      exit 3
    fi
    sleep 0.5
  done
  echo "docker engine: ready"
  ;;
stop)
  [ -f "$pidfile" ] || exit 0
  pid=$(cat "$pidfile")
  rm -f "$pidfile"
  kill -TERM "$pid" 2>/dev/null || exit 0
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { echo "docker engine: stopped"; exit 0; }; sleep 0.5; done
  echo "docker engine: did not stop within 30 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  ;;
*) echo "usage: engine.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac
