# Test-only stand-in for prom/prometheus (no image registry is reachable in CI): Debian's
# prometheus package (2.42) on the python:3.11-slim-bookworm base that make test-docker has.
# Used by docker-compose.test.yml only; docker-compose.yml keeps the official image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# wget: the compose health check of the prometheus service uses it, as in the official image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
