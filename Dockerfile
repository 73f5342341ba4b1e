# One image for every carelog app service; compose.yaml picks the process with `command:`.
#   docker build -t carelog:dev .
#   docker run --rm carelog:dev carelog serve read-api
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH

# HAProxy: the gateway runs from this image too (`carelog gateway-config` renders and
# checks its configuration, and HAProxy's master runs the revocation watcher in Python).
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && pip install --no-cache-dir uv

WORKDIR /app

# Dependencies first (cached until pyproject.toml / uv.lock change), then the code.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

COPY . .
RUN uv sync --frozen --no-dev \
 && useradd --system --uid 10001 --home-dir /app carelog \
 && install -d -o carelog /app/.stack /app/.stack/audit-spool

USER carelog
EXPOSE 4000 4001 4003 4004 4005 4010 4011 4012 4013 4014 4015 9001 1025
CMD ["carelog", "serve", "commands"]
