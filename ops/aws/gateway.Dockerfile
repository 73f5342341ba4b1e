# The gateway's image: the carelog image plus HAProxy. `carelog gateway-config` renders
# HAProxy's configuration from the services at start; HAProxy then runs in the foreground.
#   docker build -t carelog:latest .
#   docker build -f ops/aws/gateway.Dockerfile --build-arg BASE=carelog:latest -t carelog:gateway-latest .
ARG BASE=carelog:latest
FROM ${BASE}
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/*
USER carelog
EXPOSE 4004
CMD ["haproxy", "-v"]
