#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, for machines that reach Debian's archive but no
# image registry (CI here). Idempotent: does nothing when the image exists already.
#
#   deploy/docker/make-base-image.sh [IMAGE]        # default python:3.11-slim-bookworm
#
# It is Debian 12's python3.11 (3.11.2) in a minimal debootstrap root, with pip and venv, made
# importable as `python`, plus the host's extra CA certificates (a TLS-inspecting proxy's CA must be
# trusted inside containers for pip to reach the index). About 2 minutes; needs root, debootstrap
# and a running Docker engine. DOCKER (default /usr/bin/docker) and MIRROR (default: the host's
# Debian mirror from /etc/apt, else http://deb.debian.org/debian) can be set.
set -euo pipefail
IMAGE=${1:-python:3.11-slim-bookworm}
DOCKER=${DOCKER:-/usr/bin/docker}

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root to make $IMAGE" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(grep -rhoE '(URIs:|deb)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
             /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

root=$(mktemp -d /tmp/textgen-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "making base image $IMAGE from Debian bookworm ($MIRROR) in $root ..."
start=$(date +%s)
debootstrap --variant=minbase \
  --include=python3.11,python3-venv,python3-pip,python-is-python3,ca-certificates \
  bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# The official image's pip installs into the system Python; so must this one (PEP 668 marker off).
rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
# Trust the host's extra CAs (a re-signing HTTPS proxy), as the host does.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root"/usr/local/share/ca-certificates/
  chroot "$root" update-ca-certificates >/dev/null 2>&1 || { echo "error: update-ca-certificates failed in the image root" >&2; exit 1; }
fi
# As in Docker's official Debian images: apt keeps no package caches or translations in layers
# (without this, every `apt-get install` layer carries ~75 MB of /var/cache/apt/*.bin).
cat >"$root"/etc/apt/apt.conf.d/docker-clean <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
echo 'Acquire::Languages "none";' >"$root"/etc/apt/apt.conf.d/docker-no-languages
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
echo "base image $IMAGE: made in $(( $(date +%s) - start )) s"
