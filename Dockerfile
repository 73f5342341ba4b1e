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

RUN pip install --no-cache-dir uv

WORKDIR /app

# Dependencies first (cached until pyproject.toml / uv.lock change), then the code.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

COPY . .
RUN uv sync --frozen --no-dev \
 && useradd --system --uid 10001 --home-dir /app carelog

USER carelog
EXPOSE 4000 4003 4010 4011 4012 4013 4014 4015 1025
CMD ["carelog", "serve", "commands"]
