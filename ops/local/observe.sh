#!/usr/bin/env bash
# Prometheus for the local carelog stack: scrapes every service's /metrics and the
# gateway's exporter, and evaluates the alert rules of ops/prometheus/alerts.yml.
#
#   ops/local/observe.sh install   install Debian's prometheus (with promtool) if missing
#   ops/local/observe.sh up        install, render the config, start it on 127.0.0.1:9090
#                                  (idempotent: a running one gets its config reloaded)
#   ops/local/observe.sh down      stop it
#   ops/local/observe.sh status    is it running, and where
#
# Layout: .stack/prometheus/prometheus.yml (rendered from ops/prometheus/prometheus.yml),
# .stack/prometheus/data, .stack/run/prometheus.pid, .stack/logs/prometheus.log.
# Knobs (environment): CARELOG_PROMETHEUS_PORT (9090), CARELOG_GATEWAY_PORT (4004; the
# gateway's exporter listens on it + 20, see ops/gateway/generate.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK="$ROOT/.stack"
LOGS="$STACK/logs"
RUN="$STACK/run"
PROM_DIR="$STACK/prometheus"
PROM_PORT="${CARELOG_PROMETHEUS_PORT:-9090}"
GATEWAY_METRICS_PORT="$((${CARELOG_GATEWAY_PORT:-4004} + 20))"
TEMPLATE="$ROOT/ops/prometheus/prometheus.yml"
NAME=prometheus
START_TIMEOUT=60

log() { printf '[observe] %s\n' "$*" >&2; }
die() { printf '[observe] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

# --- Install --------------------------------------------------------------------------
install_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    log "prometheus: ok ($(prometheus --version 2>&1 | head -1))"
    return 0
  fi
  log "prometheus: installing the Debian package"
  # Never let the package start its own system service (it would take :9090 and write
  # to /var/lib): we run our own instance under .stack/. As in ops/local/install.sh, add
  # a temporary policy-rc.d that says "no" where there is none.
  local policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    # shellcheck disable=SC2064
    trap "as_root rm -f '$policy'" EXIT
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 ||
    die "package prometheus did not install prometheus and promtool"
  log "prometheus: installed ($(prometheus --version 2>&1 | head -1))"
}

# --- Process helpers (the same conventions as ops/local/stack.sh) -------------------
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ ${stat:0:1} != Z ]]
}

# The stack's tag: `stack.sh down` stops every tagged process with a pid file in .stack/run.
tag() { printf 'CARELOG_STACK_TAG=%s/%s' "$STACK" "$NAME"; }

live_pid() {
  local pid
  pid="$(head -1 "$RUN/$NAME.pid" 2>/dev/null | tr -dc '0-9')" || return 1
  [[ -n $pid ]] && alive "$pid" || return 1
  { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "$(tag)" || return 1
  printf '%s' "$pid"
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# --- Config ----------------------------------------------------------------------------
render_config() {
  mkdir -p "$PROM_DIR/data" "$LOGS" "$RUN"
  sed -e "s|@RULES@|$ROOT/ops/prometheus/alerts.yml|" \
      -e "s|@GATEWAY_METRICS_PORT@|$GATEWAY_METRICS_PORT|" \
      -e "s|@SCRAPE_INTERVAL@|${CARELOG_SCRAPE_INTERVAL:-15s}|" \
      "$TEMPLATE" >"$PROM_DIR/prometheus.yml.new"
  promtool check config --syntax-only "$PROM_DIR/prometheus.yml.new" >/dev/null ||
    die "rendered config $PROM_DIR/prometheus.yml.new does not check"
  mv "$PROM_DIR/prometheus.yml.new" "$PROM_DIR/prometheus.yml"
}

ready() { curl -fsS -o /dev/null -m 2 "http://127.0.0.1:$PROM_PORT/-/ready" 2>/dev/null; }

up() {
  install_prometheus
  render_config
  local pid logfile="$LOGS/$NAME.log"
  if pid="$(live_pid)"; then
    kill -HUP "$pid"
    log "prometheus: already running (pid $pid), config reloaded"
  else
    rm -f "$RUN/$NAME.pid"
    port_open "$PROM_PORT" && die "port $PROM_PORT is in use by another process (set CARELOG_PROMETHEUS_PORT)"
    printf '\n===== %s starting %s =====\n' "$(date -Is)" "$NAME" >>"$logfile"
    (
      cd "$ROOT"
      export "$(tag)"
      exec setsid nohup prometheus \
        --config.file="$PROM_DIR/prometheus.yml" \
        --storage.tsdb.path="$PROM_DIR/data" \
        --storage.tsdb.retention.time=7d \
        --web.listen-address="127.0.0.1:$PROM_PORT" \
        --web.enable-lifecycle \
        </dev/null >>"$logfile" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$RUN/$NAME.pid"
    local deadline=$((SECONDS + START_TIMEOUT))
    until ready; do
      if ! alive "$pid"; then
        rm -f "$RUN/$NAME.pid"
        tail -n 20 "$logfile" >&2
        die "prometheus exited during startup (log: .stack/logs/$NAME.log)"
      fi
      ((SECONDS < deadline)) || die "prometheus not ready after ${START_TIMEOUT}s (log: .stack/logs/$NAME.log)"
      sleep 0.2
    done
    log "prometheus: started (pid $pid)"
  fi
  log "prometheus: http://127.0.0.1:$PROM_PORT (targets at /targets, alerts at /alerts)"
}

down() {
  local pid waited=0
  if ! pid="$(live_pid)"; then
    rm -f "$RUN/$NAME.pid"
    log "prometheus: not running"
    return 0
  fi
  log "prometheus: stopping (pid $pid)"
  kill -TERM "$pid"
  while alive "$pid"; do
    if ((waited >= 300)); then
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$RUN/$NAME.pid"
  log "prometheus: stopped"
}

status() {
  local pid
  if pid="$(live_pid)"; then
    log "prometheus: up (pid $pid) at http://127.0.0.1:$PROM_PORT"
  else
    log "prometheus: down"
    return 1
  fi
}

case "${1:-up}" in
  install) install_prometheus ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: $0 install|up|down|status" ;;
esac
