# syntax=docker/dockerfile:1
# One image, three services: roomcast-gateway (the default), roomcast-persister, roomcast-sweeper,
# plus the operator command `roomcast` (e.g. `roomcast migrate`). Kubernetes picks one with `command`.
#   docker build -t roomcast:0.1.0 .
#   docker run --rm -p 8001:8001 roomcast:0.1.0                      # gateway
#   docker run --rm roomcast:0.1.0 roomcast-persister                # persister
# The base image is a moving patch tag on purpose (security fixes); the release pipeline pins its
# digest (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: build the wheel and install it with its dependencies into a venv -------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml ./
COPY shared ./shared
COPY gateway ./gateway
COPY persister ./persister
COPY sweeper ./sweeper
# Build a wheel (no editable install, no sources in the runtime image), then install it; the
# dependencies' version ranges come from pyproject.toml. Every dependency ships manylinux wheels
# for CPython 3.11, so no compiler is needed.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl

# ---- runtime: the venv only, run by a fixed non-root user ----------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="roomcast" \
      org.opencontainers.image.description="Horizontally scaled WebSocket chat backend" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed UID/GID so Kubernetes' runAsUser/runAsNonRoot and file ownership are predictable.
RUN groupadd --system --gid 10001 roomcast \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin roomcast
COPY --from=builder /opt/venv /opt/venv
# HOST=0.0.0.0: inside a container the gateway (and the persister/sweeper metrics port) must listen
# on all interfaces; every other setting comes from the environment (shared/settings.py).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8001
USER 10001:10001
EXPOSE 8001
# Exec form: the service is PID 1 and receives SIGTERM itself (the gateway drains on it).
CMD ["roomcast-gateway"]
