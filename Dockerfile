# syntax=docker/dockerfile:1
# One image for every relaygate process; pick it with the command:
#   python -m services.relay | services.auth | services.quota | services.logger | services.migrations
# Build: docker build -t relaygate:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its dependencies into a virtualenv -------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/relaygate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# The runtime dependencies exactly as pyproject.toml declares them (no extras); all ship wheels.
RUN /opt/relaygate/bin/pip install .

# --- runtime: the virtualenv on a clean slim base, no compilers, no pip cache, not root -----------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="relaygate" \
      org.opencontainers.image.description="OpenAI-compatible LLM API gateway" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 relaygate \
    && useradd --system --uid 10001 --gid relaygate --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relaygate

COPY --from=build /opt/relaygate /opt/relaygate

# Bytecode was compiled at install time; the root filesystem is read-only in Kubernetes.
# Production by default: services refuse unset, published, short or patterned secrets. A development
# setup opts out explicitly with RELAYGATE_ENVIRONMENT=dev (and still has to provide its own secrets).
ENV PATH=/opt/relaygate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAYGATE_ENVIRONMENT=prod

WORKDIR /opt/relaygate
USER 10001:10001

# relay HTTP; auth, quota, logger gRPC; Prometheus metrics of the gRPC services.
EXPOSE 8080 50051 50052 50053 9090

CMD ["python", "-m", "services.relay"]
