# syntax=docker/dockerfile:1.7
# One image for every process of the stack (api, scheduler, recorder, reaper, agent, worker,
# migrate, rq-dashboard); compose.yaml picks the command. Multi-stage: wheels are built and
# installed into a virtualenv in the build stage; the runtime stage copies only that virtualenv
# onto a slim base and runs as an unprivileged user. No CUDA base is needed: the agent reads
# NVML from the host driver that the NVIDIA container toolkit mounts in.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (cached while only the code changes): install the project's requirements
# from pyproject.toml with a stub package, then the real sources.
COPY pyproject.toml README.md ./
RUN mkdir -p allocator workers && touch allocator/__init__.py workers/__init__.py \
    && pip install ".[dashboard]" && pip uninstall -y rq-allocator
COPY allocator ./allocator
COPY workers ./workers
RUN pip install --no-deps ".[dashboard]" \
    && python -c "import allocator.api.app, workers, allocator.history.migrate" \
    && allocator --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="rq-allocator" \
      org.opencontainers.image.description="Redis-backed allocator of GPU memory, CPU cores and RAM for queued tasks"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ALLOCATOR_STATE_DIR=/app/state
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9181 9100
CMD ["allocator", "--help"]
