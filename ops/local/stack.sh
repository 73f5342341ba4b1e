#!/usr/bin/env bash
# carelog local stack: PostgreSQL 15, Redis, Kafka 3.9 (KRaft) and the app services,
# all running natively with their state under .stack/ in the repo root.
#
#   ops/local/stack.sh up       install what is missing, start infra + app services
#   ops/local/stack.sh infra    install what is missing, start PostgreSQL, Redis, Kafka only
#   ops/local/stack.sh down     stop the app services, then the infra
#   ops/local/stack.sh status   what runs where (exit 0 when all infra is up)
#   ops/local/stack.sh logs     follow every log (tail -F .stack/logs/*.log)
#   ops/local/stack.sh reset    down, then delete all data under .stack (keeps the Kafka jars)
#   ops/local/stack.sh env      print `export` lines: eval "$(ops/local/stack.sh env)"
#   ops/local/stack.sh kafka-run CLASS ARGS...   run a Kafka tool on the broker's classpath, e.g.
#       kafka-run org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 \
#         --command-config .stack/secrets/kafka-client.properties --list
#   source ops/local/stack.sh   export the same variables into the current bash shell
#
# Layout: .stack/logs/<name>.log, .stack/run/<name>.pid, .stack/pg/data,
# .stack/redis, .stack/kafka/{libs,data}, .stack/secrets. Settings come from
# ops/local/dev.env; the credentials of Redis and Kafka are generated once, at random,
# into .stack/secrets (mode 600) and added to what `env` prints and the services get.
# Knobs (environment): CARELOG_SKIP_INSTALL=1 skips ops/local/install.sh;
# CARELOG_STACK_SERVICES replaces the service table below (same format).

# Sourced (`source ops/local/stack.sh`): export what `env` prints (dev.env and the
# stack's credentials) into the caller's shell and stop here, leaving nothing else behind.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  eval "$(bash "${BASH_SOURCE[0]}" env)" || return 1
  return 0
fi

# --- App services --------------------------------------------------------------
# One line per service: name | command (run from the repo root, env from dev.env) |
# readiness URL (must answer 2xx; its port is checked for conflicts before start).
# `up` starts them all, `infra` none. Add a line to add a service.
CARELOG_SERVICES_DEFAULT='
commands    | uv run carelog serve commands     | http://127.0.0.1:4000/health/ready
read-api    | uv run carelog serve read-api     | http://127.0.0.1:4003/health/ready
relay       | uv run carelog relay              | http://127.0.0.1:4010/health/ready
projection  | uv run carelog project directory  | http://127.0.0.1:4011/health/ready
appointments | uv run carelog project appointments | http://127.0.0.1:4012/health/ready
reactions   | uv run carelog react patient-removals | http://127.0.0.1:4013/health/ready
analytics   | uv run carelog project analytics  | http://127.0.0.1:4014/health/ready
mail        | uv run python -m ops.local.mailcatcher | http://127.0.0.1:4016/health/ready
notifier    | uv run carelog notify             | http://127.0.0.1:4015/health/ready
auth        | uv run carelog serve auth         | http://127.0.0.1:4005/health/ready
billing     | uv run carelog serve billing      | http://127.0.0.1:4001/health/ready
'

# --- Paths and settings --------------------------------------------------------------
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEV_ENV="$ROOT/ops/local/dev.env"

# Read dev.env (KEY=VALUE lines) and export it into this script (and so its children).
_stack_load_env() {
  local line key
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    key="${line%%=*}"
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    export "$key=${line#*=}"
  done <"$DEV_ENV"
}

# dev.env, then the stack's credentials (once generated): what the services get.
_stack_print_env() {
  local line key
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    key="${line%%=*}"
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    [[ -n ${CREDENTIAL_ENV[$key]+set} ]] && continue
    printf 'export %s=%q\n' "$key" "${line#*=}"
  done <"$DEV_ENV"
  for key in $(printf '%s\n' "${!CREDENTIAL_ENV[@]}" | sort); do
    printf 'export %s=%q\n' "$key" "${CREDENTIAL_ENV[$key]}"
  done
}

_stack_load_env

STACK="$ROOT/.stack"
LOGS="$STACK/logs"
RUN="$STACK/run"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_DATA="$STACK/pg/data"
PG_SOCK="$STACK/pg/socket"
REDIS_DIR="$STACK/redis"
KAFKA_LIBS="$STACK/kafka/libs"
KAFKA_DATA="$STACK/kafka/data"
KAFKA_CONF="$STACK/kafka/server.properties"
SECRETS="$STACK/secrets"
# The broker's own SCRAM user (its inter-broker connections); the services use kafka.user.
KAFKA_BROKER_USER=broker
# Fixed cluster id: the data dir is formatted once with it (kafka.tools.StorageTool).
KAFKA_CLUSTER_ID="otP6v5_iTqitOmevcItv7g"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"

# Readiness timeouts in seconds.
PG_TIMEOUT=60
REDIS_TIMEOUT=20
KAFKA_TIMEOUT=90
SERVICE_TIMEOUT="${CARELOG_SERVICE_TIMEOUT:-90}"
STOP_TIMEOUT=30

# Addresses come from dev.env, so there is one place that says where things are.
if [[ $CARELOG_DATABASE_URL =~ ^postgres(ql)?://([^:@/]+):([^@/]*)@([^:/]+):([0-9]+)/([^?]+) ]]; then
  PG_USER="${BASH_REMATCH[2]}" PG_PASSWORD="${BASH_REMATCH[3]}" PG_HOST="${BASH_REMATCH[4]}"
  PG_PORT="${BASH_REMATCH[5]}" PG_DB="${BASH_REMATCH[6]}"
else
  echo "stack: cannot parse CARELOG_DATABASE_URL in $DEV_ENV (want postgresql://user:pass@host:port/db)" >&2
  exit 1
fi
[[ $CARELOG_REDIS_URL =~ ^redis://([^:/]+):([0-9]+) ]] || { echo "stack: cannot parse CARELOG_REDIS_URL" >&2; exit 1; }
REDIS_HOST="${BASH_REMATCH[1]}" REDIS_PORT="${BASH_REMATCH[2]}"
[[ $CARELOG_KAFKA_BOOTSTRAP =~ ^([^:,]+):([0-9]+)$ ]] || { echo "stack: cannot parse CARELOG_KAFKA_BOOTSTRAP" >&2; exit 1; }
KAFKA_HOST="${BASH_REMATCH[1]}" KAFKA_PORT="${BASH_REMATCH[2]}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
REDIS_ADDRESS_URL="$CARELOG_REDIS_URL"  # as dev.env says it, without the password

# --- Credentials -------------------------------------------------------------------------
# Generated once by `up`/`infra` into .stack/secrets (directory 700, files 600), never
# committed anywhere: redis.password, kafka.user, kafka.password (the services' SCRAM user),
# kafka-broker.password, claim.key (the email claims' key: 256 bits, hex), master.key (wraps
# every patient's data key: CARELOG_MASTER_KEY; losing it makes every sealed personal field
# unreadable), and kafka-client.properties for the Kafka command-line tools.
# A missing file is generated afresh on the next `up` (that is how to rotate one: see
# docs/deploy.md). Until they exist (a stack started before it authenticated clients),
# `env` prints dev.env alone.
random_secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }  # 128 bits, hex
random_key() { head -c 32 /dev/urandom | base64 | tr -d '\n'; }  # 256 bits, base64
read_secret() {
  local value
  value="$(head -n 1 "$SECRETS/$1" 2>/dev/null)" || return 1
  [[ -n $value ]] && printf '%s' "$value"
}

ensure_secret() {
  local file="$SECRETS/$1"
  [[ -s $file ]] && return 0
  (umask 077 && printf '%s\n' "${2:-$(random_secret)}" >"$file.new" && mv "$file.new" "$file")
  say "credentials: generated $(rel "$file")"
}

# Fills REDIS_PASSWORD, KAFKA_USER, KAFKA_PASSWORD, KAFKA_BROKER_PASSWORD and
# CREDENTIAL_ENV (the settings that carry them) from .stack/secrets, if it is complete.
declare -A CREDENTIAL_ENV=()
load_credentials() {
  local master
  master="$(read_secret master.key)" && export CARELOG_MASTER_KEY="$master" &&
    CREDENTIAL_ENV[CARELOG_MASTER_KEY]="$master"
  REDIS_PASSWORD="$(read_secret redis.password)" &&
    KAFKA_USER="$(read_secret kafka.user)" &&
    KAFKA_PASSWORD="$(read_secret kafka.password)" &&
    KAFKA_BROKER_PASSWORD="$(read_secret kafka-broker.password)" || return 0
  CREDENTIAL_ENV+=(
    [CARELOG_REDIS_URL]="${REDIS_ADDRESS_URL/#redis:\/\//redis://:$REDIS_PASSWORD@}"
    [CARELOG_KAFKA_SECURITY_PROTOCOL]=SASL_PLAINTEXT
    [CARELOG_KAFKA_SASL_MECHANISM]=SCRAM-SHA-512
    [CARELOG_KAFKA_USERNAME]="$KAFKA_USER"
    [CARELOG_KAFKA_PASSWORD]="$KAFKA_PASSWORD"
  )
  local key claim_key
  # The email claims' key (CARELOG_CLAIM_KEY): a stack made before it existed gets it
  # on its next `up`; until then the development default applies.
  claim_key="$(read_secret claim.key)" && CREDENTIAL_ENV[CARELOG_CLAIM_KEY]="$claim_key"
  for key in "${!CREDENTIAL_ENV[@]}"; do export "$key=${CREDENTIAL_ENV[$key]}"; done
}

make_credentials() {
  (umask 077 && mkdir -p "$SECRETS")
  chmod 700 "$SECRETS"
  ensure_secret redis.password
  ensure_secret kafka.user carelog
  ensure_secret kafka.password
  ensure_secret kafka-broker.password
  ensure_secret claim.key "$(random_secret)$(random_secret)"
  ensure_secret master.key "$(random_key)"
  load_credentials
  (umask 077 && cat >"$SECRETS/kafka-client.properties.new" <<EOF && mv "$SECRETS/kafka-client.properties.new" "$SECRETS/kafka-client.properties")
# generated by ops/local/stack.sh: --command-config for the Kafka tools (stack.sh kafka-run)
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$KAFKA_USER" password="$KAFKA_PASSWORD";
EOF
  chmod 600 "$SECRETS"/*
}

REDIS_PASSWORD="" KAFKA_USER="" KAFKA_PASSWORD="" KAFKA_BROKER_PASSWORD=""
load_credentials

INFRA=(postgres redis kafka)

# --- Helpers --------------------------------------------------------------------------
say() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }
rel() { printf '%s' "${1#"$ROOT"/}"; }
trim() { local s="${1#"${1%%[![:space:]]*}"}"; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

# Show the end of a log after a failure, then die.
die_log() {
  local msg=$1 log=$2
  if [[ -s $log ]]; then
    printf '[stack] ---- last lines of %s ----\n' "$(rel "$log")" >&2
    tail -n 25 "$log" | sed 's/^/[stack]   /' >&2
  fi
  die "$msg (log: $(rel "$log"))"
}

# Is anything accepting TCP connections on host:port?
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# Who listens on a port, for error messages.
port_owner() {
  local out
  out="$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(([^)]*))' | head -1 || true)"
  [[ -n $out ]] && printf '%s' "$out" || printf 'another process'
}

# Alive and not a zombie waiting for its reaper.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ ${stat:0:1} != Z ]]
}

# Every process the stack starts carries this in its environment; it tells our
# processes from anything else (a reused pid, another checkout's stack).
tag_of() { printf 'CARELOG_STACK_TAG=%s/%s' "$STACK" "$1"; }

# pid from .stack/run/<name>.pid when it is a live process we started, else nothing.
live_pid() {
  local name=$1 pidfile="$RUN/$1.pid" pid
  [[ -f $pidfile ]] || return 1
  pid="$(head -1 "$pidfile" 2>/dev/null | tr -dc '0-9')"
  [[ -n $pid ]] && alive "$pid" || return 1
  if ! { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "$(tag_of "$name")"; then
    # redis-server rewrites its environ block for its process title: recognise it by
    # its working directory (.stack/redis) instead.
    [[ $name == redis && "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$REDIS_DIR" ]] || return 1
  fi
  printf '%s' "$pid"
}

# Die when a port we are about to bind is held by something that is not ours.
require_free_port() {
  local name=$1 host=$2 port=$3 where=${4:-ops/local/dev.env}
  if port_open "$host" "$port"; then
    die "port $port ($name) on $host is already in use by $(port_owner "$port"), which is not this stack ($STACK). Stop that process, or change the port in $where."
  fi
}

# Run a program as the PostgreSQL OS user (root may not run postgres).
as_pg() {
  if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Launch a long-running process in its own session, detached, logging to its log.
# Usage: launch NAME CMD...   (writes .stack/run/NAME.pid)
launch() {
  local name=$1; shift
  local log="$LOGS/$name.log"
  printf '\n===== %s starting %s =====\n' "$(date -Is)" "$name" >>"$log"
  (
    cd "$ROOT"
    export "$(tag_of "$name")"
    # 9>&- : do not hand the stack lock to the child.
    exec setsid nohup "$@" </dev/null >>"$log" 2>&1 9>&-
  ) &
  echo $! >"$RUN/$name.pid"
}

# Stop a process (group) we started: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local name=$1 pid=$2 timeout=${3:-$STOP_TIMEOUT} waited=0
  say "$name: stopping (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid"; do
    if ((waited >= timeout * 10)); then
      say "$name: still alive after ${timeout}s, sending SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  # Leftovers in its process group (e.g. the python under `uv run`).
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
}

stop_named() {
  local name=$1 timeout=${2:-$STOP_TIMEOUT} pid
  if pid="$(live_pid "$name")"; then
    stop_pid "$name" "$pid" "$timeout"
    say "$name: stopped"
  else
    rm -f "$RUN/$name.pid"
  fi
}

# Poll CHECK (a command) until it succeeds; fail when TIMEOUT passes or PID dies.
wait_until() {
  local name=$1 timeout=$2 pid=$3 log=$4; shift 4
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if [[ -n $pid ]] && ! alive "$pid"; then
      rm -f "$RUN/$name.pid"
      die_log "$name exited during startup" "$log"
    fi
    if ((SECONDS >= deadline)); then
      # Do not leave a half-started process behind: the next run starts it afresh.
      [[ -n $pid ]] && stop_pid "$name" "$pid" 10
      die_log "$name not ready after ${timeout}s" "$log"
    fi
    sleep 0.2
  done
}

prepare_dirs() {
  mkdir -p "$LOGS" "$RUN"
}

lock_stack() {
  exec 9>"$RUN/stack.lock"
  flock -w 600 9 || die "another stack.sh holds $(rel "$RUN/stack.lock")"
}

run_install() {
  [[ ${CARELOG_SKIP_INSTALL:-0} == 1 ]] && return 0
  "$ROOT/ops/local/install.sh" 9>&-
}

# --- PostgreSQL --------------------------------------------------------------------------
pg_ctl_() { as_pg "$PG_BIN/pg_ctl" "$@"; }
# Running = postmaster.pid names a live postgres process and pg_ctl agrees. (A pid file
# left by a killed server can name a pid that some other process has since got.)
pg_running() {
  local pid
  pid="$(head -1 "$PG_DATA/postmaster.pid" 2>/dev/null)" || return 1
  [[ -n $pid ]] && alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == postgres ]] || return 1
  pg_ctl_ status -D "$PG_DATA" >/dev/null 2>&1
}
pg_psql() { PGOPTIONS='-c client_min_messages=warning' as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres "$@"; }

# The postgres user must be able to reach .stack/pg: add o+x to any parent dir
# it cannot traverse (only search permission, nothing readable).
pg_fix_traversal() {
  [[ $EUID -eq 0 ]] || return 0
  runuser -u postgres -- test -x "$STACK" 2>/dev/null && return 0
  local d="" part
  IFS='/' read -ra parts <<<"${STACK#/}"
  for part in "${parts[@]}"; do
    d="$d/$part"
    if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
      say "postgres: granting search permission (o+x) on $d so the postgres user can reach .stack/pg"
      chmod o+x "$d"
    fi
  done
}

pg_init() {
  mkdir -p "$STACK/pg"
  pg_fix_traversal
  mkdir -p "$PG_SOCK"
  touch "$LOGS/postgres.log"
  if [[ $EUID -eq 0 ]]; then
    chown postgres: "$STACK/pg" "$PG_SOCK" "$LOGS/postgres.log"
  fi
  chmod 700 "$PG_SOCK"
  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    say "postgres: initdb $(rel "$PG_DATA")"
    rm -rf "$PG_DATA"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
      --auth-local=peer --auth-host=scram-sha-256 --no-instructions \
      >>"$LOGS/postgres.log" 2>&1 || die_log "postgres: initdb failed" "$LOGS/postgres.log"
  fi
  pg_conf
}

# .stack/pg/data/carelog.conf from ops/local/postgres/postgresql.conf. Rendered on every
# `up` (a running cluster then reloads it), so edits to that file apply to existing clusters.
pg_conf() {
  grep -q "^include_if_exists = 'carelog.conf'" "$PG_DATA/postgresql.conf" ||
    echo "include_if_exists = 'carelog.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
  {
    echo "# generated by ops/local/stack.sh from ops/local/postgres/postgresql.conf; edit that file"
    cat "$ROOT/ops/local/postgres/postgresql.conf"
    echo "listen_addresses = '$PG_HOST'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$PG_SOCK'"
  } | as_pg tee "$PG_DATA/carelog.conf" >/dev/null
}

pg_bootstrap() {
  # Role and database from CARELOG_DATABASE_URL; re-applied every time (idempotent).
  pg_psql -d postgres <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE "$PG_USER" LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE "$PG_USER" LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE "$PG_DB" OWNER "$PG_USER"'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
SQL
  pg_psql -d "$PG_DB" <"$ROOT/ops/local/postgres/extensions.sql"
}

db_migrate() {
  # The schema's versioned migrations (bootstrap/migrations/), before any service starts.
  local log="$LOGS/migrate.log"
  (cd "$ROOT" && uv run carelog db migrate >>"$log" 2>&1 9>&-) ||
    die_log "database migration failed" "$log"
  say "postgres: schema migrated ($(tail -n 1 "$log"))"
}

pg_up() {
  local log="$LOGS/postgres.log"
  if pg_running; then
    say "postgres: already running (pid $(head -1 "$PG_DATA/postmaster.pid"))"
    # Settings that a reload applies (logging among them) take effect now; the few that
    # need a restart (ports, memory) wait for the next start.
    pg_conf
    pg_ctl_ reload -D "$PG_DATA" -s || die_log "postgres: reloading its settings failed" "$log"
  else
    require_free_port postgres "$PG_HOST" "$PG_PORT"
    if [[ -f $PG_DATA/postmaster.pid ]]; then
      say "postgres: removing stale $(rel "$PG_DATA/postmaster.pid") (no server runs from it)"
      rm -f "$PG_DATA/postmaster.pid"
    fi
    pg_init
    say "postgres: starting on $PG_HOST:$PG_PORT"
    printf '\n===== %s starting postgres =====\n' "$(date -Is)" >>"$log"
    # -w: pg_ctl waits until the server accepts connections (bounded by -t);
    # setsid: the postmaster gets its own session, away from the caller's terminal.
    local pg_start=("$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$log" -w -t "$PG_TIMEOUT" -s)
    [[ $EUID -eq 0 ]] && pg_start=(runuser -u postgres -- "${pg_start[@]}")
    if ! setsid -w "${pg_start[@]}" </dev/null 9>&-; then
      die_log "postgres did not start within ${PG_TIMEOUT}s" "$log"
    fi
  fi
  head -1 "$PG_DATA/postmaster.pid" >"$RUN/postgres.pid"
  wait_until postgres "$PG_TIMEOUT" "" "$log" port_open "$PG_HOST" "$PG_PORT"
  pg_bootstrap || die_log "postgres: creating role/database $PG_USER/$PG_DB failed" "$log"
  say "postgres: ready ($PG_HOST:$PG_PORT, database $PG_DB)"
}

pg_down() {
  if pg_running; then
    say "postgres: stopping (fast)"
    pg_ctl_ stop -D "$PG_DATA" -m fast -w -t "$STOP_TIMEOUT" -s ||
      pg_ctl_ stop -D "$PG_DATA" -m immediate -w -t 10 -s || true
    say "postgres: stopped"
  fi
  rm -f "$RUN/postgres.pid"
}

# --- Redis ---------------------------------------------------------------------------------
# redis-cli with the stack's password (from the environment, not the command line).
redis_cli() { REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" "$@"; }
redis_ping() { [[ "$(redis_cli ping 2>/dev/null)" == PONG ]]; }

# .stack/redis/redis.conf (mode 600: it holds the password) from ops/local/redis/redis.conf.
redis_conf() {
  mkdir -p "$REDIS_DIR"
  (
    umask 077
    {
      sed -e "s|@STACK@|$STACK|g" -e "s|@PORT@|$REDIS_PORT|g" -e "s|^bind .*|bind $REDIS_HOST|" \
        "$ROOT/ops/local/redis/redis.conf"
      echo "requirepass $REDIS_PASSWORD"
    } >"$REDIS_DIR/redis.conf.new"
  )
  mv "$REDIS_DIR/redis.conf.new" "$REDIS_DIR/redis.conf"
}

redis_up() {
  local log="$LOGS/redis.log" pid
  redis_conf
  if pid="$(live_pid redis)"; then
    say "redis: already running (pid $pid)"
    # Started before the stack set a password: set it now (the file has it for the next start).
    if [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; then
      say "redis: it accepts clients without a password; setting the one in $(rel "$SECRETS/redis.password")"
      printf 'CONFIG SET requirepass %s\n' "$REDIS_PASSWORD" |
        redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" >/dev/null || die_log "redis: setting its password failed" "$log"
    fi
  else
    rm -f "$RUN/redis.pid"
    require_free_port redis "$REDIS_HOST" "$REDIS_PORT"
    command -v redis-server >/dev/null || die "redis-server not installed (run ops/local/install.sh)"
    say "redis: starting on $REDIS_HOST:$REDIS_PORT (password in $(rel "$SECRETS/redis.password"))"
    # daemonize yes: redis forks, writes .stack/run/redis.pid and detaches itself.
    (export "$(tag_of redis)"; cd "$REDIS_DIR" && redis-server "$REDIS_DIR/redis.conf" </dev/null >>"$log" 2>&1 9>&-) ||
      die_log "redis-server failed to start" "$log"
  fi
  local deadline=$((SECONDS + REDIS_TIMEOUT))
  until redis_ping; do
    ((SECONDS < deadline)) || die_log "redis not ready after ${REDIS_TIMEOUT}s (or it refuses the password in $(rel "$SECRETS/redis.password"))" "$log"
    sleep 0.1
  done
  pid="$(live_pid redis)" || die_log "redis answers on $REDIS_PORT but $(rel "$RUN/redis.pid") does not point at it" "$log"
  say "redis: ready ($REDIS_HOST:$REDIS_PORT)"
}

# --- Kafka -----------------------------------------------------------------------------------
# The JVM command line shared by the broker and the storage tool (as in kafka-run-class.sh).
kafka_java_cmd() {
  local heap
  read -ra heap <<<"$KAFKA_HEAP_OPTS"
  KAFKA_JAVA=(java "${heap[@]}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
    -Djava.awt.headless=true -Dkafka.logs.dir="$LOGS"
    -Dlog4j.configuration="file:$ROOT/ops/local/kafka/log4j.properties"
    -cp "$KAFKA_LIBS/*")
}

# Where in kafka.log the current start begins (readiness only looks after it).
KAFKA_LOG_OFFSET=0

# Clients authenticate with SCRAM-SHA-512; its users live in the cluster's metadata and
# are created when the storage is formatted (`--add-scram`), so no step ever runs without
# authentication. This file in the data dir records which credentials those were (a hash).
# A storage without it was formatted before the stack authenticated clients (or with
# credentials since deleted from .stack/secrets): Kafka 3.9 cannot add a SCRAM user over
# its controller listener, and its client listener admits no one without one, so such a
# storage is moved aside (.stack/kafka/data.before-scram-*) and formatted afresh. The
# services recreate their topics; the event store (PostgreSQL) keeps every event.
KAFKA_SCRAM_MARK="$KAFKA_DATA/carelog-scram.sha256"
kafka_scram_mark() {
  printf '%s\n' "$KAFKA_USER:$KAFKA_PASSWORD" "$KAFKA_BROKER_USER:$KAFKA_BROKER_PASSWORD" |
    sha256sum | cut -d ' ' -f 1
}
kafka_storage_current() {
  [[ -f $KAFKA_DATA/meta.properties && "$(cat "$KAFKA_SCRAM_MARK" 2>/dev/null)" == "$(kafka_scram_mark)" ]]
}

# .stack/kafka/server.properties (mode 600: it holds the broker's password).
kafka_conf() {
  (
    umask 077
    sed -e "s|@DATA@|$KAFKA_DATA|g" -e "s|@PORT@|$KAFKA_PORT|g" \
      -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" -e "s|127\.0\.0\.1|$KAFKA_HOST|g" \
      -e "s|@BROKER_USER@|$KAFKA_BROKER_USER|g" -e "s|@BROKER_PASSWORD@|$KAFKA_BROKER_PASSWORD|g" \
      "$ROOT/ops/local/kafka/server.properties" >"$KAFKA_CONF.new"
  )
  mv "$KAFKA_CONF.new" "$KAFKA_CONF"
}

kafka_format() {
  local log="$LOGS/kafka.log" aside
  if [[ -f $KAFKA_DATA/meta.properties ]] && ! kafka_storage_current; then
    aside="$STACK/kafka/data.before-scram-$(date +%Y%m%dT%H%M%S)"
    say "kafka: $(rel "$KAFKA_DATA") has no SCRAM users for the credentials in $(rel "$SECRETS")" \
      "(formatted before the stack authenticated clients): moving it to $(rel "$aside")" \
      "and formatting afresh (delete $(rel "$aside") once you do not need it)"
    mv "$KAFKA_DATA" "$aside"
    mkdir -p "$KAFKA_DATA"
  fi
  [[ -f $KAFKA_DATA/meta.properties ]] && return 0
  say "kafka: formatting storage $(rel "$KAFKA_DATA") (cluster id $KAFKA_CLUSTER_ID, SCRAM users $KAFKA_USER, $KAFKA_BROKER_USER)"
  "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format -t "$KAFKA_CLUSTER_ID" -c "$KAFKA_CONF" \
    --add-scram "SCRAM-SHA-512=[name=$KAFKA_USER,password=$KAFKA_PASSWORD]" \
    --add-scram "SCRAM-SHA-512=[name=$KAFKA_BROKER_USER,password=$KAFKA_BROKER_PASSWORD]" \
    >>"$log" 2>&1 9>&- || die_log "kafka: storage format failed" "$log"
  (umask 077 && kafka_scram_mark >"$KAFKA_SCRAM_MARK")
}

# Start the broker without waiting (PostgreSQL and Redis start meanwhile).
kafka_launch() {
  local log="$LOGS/kafka.log" pid
  if pid="$(live_pid kafka)"; then
    if kafka_storage_current; then
      say "kafka: already running (pid $pid)"
      local size
      size="$(stat -c %s "$log" 2>/dev/null || echo 0)"
      KAFKA_LOG_OFFSET=$((size > 20000000 ? size - 20000000 : 0))
      return 0
    fi
    say "kafka: running without the SCRAM users of $(rel "$SECRETS"); restarting it"
    stop_named kafka "$STOP_TIMEOUT"
  fi
  rm -f "$RUN/kafka.pid"
  require_free_port kafka "$KAFKA_HOST" "$KAFKA_PORT"
  require_free_port "kafka controller" "$KAFKA_HOST" "$KAFKA_CONTROLLER_PORT" "KAFKA_CONTROLLER_PORT"
  compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null || die "no Kafka jars in $(rel "$KAFKA_LIBS") (run ops/local/install.sh)"
  command -v java >/dev/null || die "java not installed (run ops/local/install.sh)"
  mkdir -p "$KAFKA_DATA"
  kafka_conf
  touch "$log"
  kafka_java_cmd
  kafka_format
  KAFKA_LOG_OFFSET="$(stat -c %s "$log")"
  say "kafka: starting on $KAFKA_HOST:$KAFKA_PORT (SASL_PLAINTEXT, SCRAM-SHA-512; controller $KAFKA_CONTROLLER_PORT)"
  launch kafka "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_CONF"
}

# Ready = the listener accepts and, since the latest start, the broker logged
# "Kafka Server started" (KRaft logs it after the broker is registered and unfenced).
kafka_started() {
  port_open "$KAFKA_HOST" "$KAFKA_PORT" || return 1
  tail -c "+$((KAFKA_LOG_OFFSET + 1))" "$LOGS/kafka.log" |
    awk '/^===== .* starting kafka =====$/ { s = 0 } /Kafka Server started/ { s = 1 } END { exit !s }'
}

kafka_wait() {
  local pid
  pid="$(cat "$RUN/kafka.pid")"
  wait_until kafka "$KAFKA_TIMEOUT" "$pid" "$LOGS/kafka.log" kafka_started
  say "kafka: ready ($KAFKA_HOST:$KAFKA_PORT)"
}

# --- App services --------------------------------------------------------------------------
# Fills SVC_NAMES / SVC_CMDS / SVC_URLS from the table.
load_services() {
  SVC_NAMES=() SVC_CMDS=() SVC_URLS=()
  local line name cmd url
  while IFS= read -r line; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    IFS='|' read -r name cmd url <<<"$line"
    name="$(trim "$name")" cmd="$(trim "$cmd")" url="$(trim "$url")"
    [[ -n $name && -n $cmd && -n $url ]] || die "bad service line: $line"
    SVC_NAMES+=("$name") SVC_CMDS+=("$cmd") SVC_URLS+=("$url")
  done <<<"${CARELOG_STACK_SERVICES:-$CARELOG_SERVICES_DEFAULT}"
}

url_hostport() { # http://host:port/path -> "host port"
  [[ $1 =~ ^https?://([^:/]+):([0-9]+) ]] || die "service URL needs an explicit host:port: $1"
  printf '%s %s' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
}

http_ok() { curl -fsS -o /dev/null -m 2 "$1" 2>/dev/null; }

services_up() {
  load_services
  local i name pid host port started=()
  for i in "${!SVC_NAMES[@]}"; do
    name="${SVC_NAMES[$i]}"
    if pid="$(live_pid "$name")"; then
      say "$name: already running (pid $pid)"
      started+=("$i")
      continue
    fi
    rm -f "$RUN/$name.pid"
    read -r host port <<<"$(url_hostport "${SVC_URLS[$i]}")"
    require_free_port "$name" "$host" "$port" "the service table of ops/local/stack.sh"
    say "$name: starting: ${SVC_CMDS[$i]}"
    launch "$name" env PYTHONUNBUFFERED=1 bash -c "exec ${SVC_CMDS[$i]}"
    started+=("$i")
  done
  local deadline=$((SECONDS + SERVICE_TIMEOUT)) left
  for i in "${started[@]}"; do
    name="${SVC_NAMES[$i]}"
    pid="$(cat "$RUN/$name.pid" 2>/dev/null || true)"
    left=$((deadline - SECONDS)); ((left > 0)) || left=1
    wait_until "$name" "$left" "$pid" "$LOGS/$name.log" http_ok "${SVC_URLS[$i]}"
    say "$name: ready (${SVC_URLS[$i]})"
  done
}

services_down() {
  load_services
  local name f
  stop_named gateway 15
  for name in "${SVC_NAMES[@]}"; do stop_named "$name" 15; done
  # Anything else with a pid file (e.g. a service removed from the table while running).
  for f in "$RUN"/*.pid; do
    [[ -e $f ]] || continue
    name="$(basename "$f" .pid)"
    [[ " ${INFRA[*]} " == *" $name "* ]] && continue
    stop_named "$name" 15
  done
}

# --- Gateway (HAProxy) ----------------------------------------------------------------------
# Started after the app services: `carelog gateway-config` renders its config from the
# auth service's keys, then HAProxy runs in master-worker mode (SIGUSR2 = graceful reload).
GATEWAY_PORT="${CARELOG_GATEWAY_PORT:-4004}"
GATEWAY_DIR="${CARELOG_GATEWAY_DIR:-$STACK/gateway}"
GATEWAY_URL="http://127.0.0.1:$GATEWAY_PORT/health/ready"

gateway_up() {
  local log="$LOGS/gateway.log" pid haproxy
  haproxy="$(command -v haproxy || echo /usr/sbin/haproxy)"
  [[ -x $haproxy ]] || die "haproxy not installed (run ops/local/install.sh)"
  (cd "$ROOT" && uv run carelog gateway-config >>"$log" 2>&1 9>&-) ||
    die_log "gateway: rendering the HAProxy config failed" "$log"
  if pid="$(live_pid gateway)"; then
    kill -USR2 "$pid" && say "gateway: config reloaded (pid $pid)"
  else
    rm -f "$RUN/gateway.pid"
    require_free_port gateway 127.0.0.1 "$GATEWAY_PORT" "CARELOG_GATEWAY_PORT"
    say "gateway: starting HAProxy on :$GATEWAY_PORT"
    launch gateway "$haproxy" -W -db -f "$GATEWAY_DIR/haproxy.cfg" -p "$GATEWAY_DIR/haproxy.pid"
  fi
  wait_until gateway "$SERVICE_TIMEOUT" "$(cat "$RUN/gateway.pid")" "$log" http_ok "$GATEWAY_URL"
  say "gateway: ready (http://localhost:$GATEWAY_PORT, docs at /api-docs)"
}

# --- Overview -------------------------------------------------------------------------------
# print_table [infra]: what runs where; with "infra", leave out the app services.
print_table() {
  local pid state
  row() { printf '%-12s %-14s %-56s %s\n' "$@"; }
  row COMPONENT STATE ADDRESS LOG
  if pg_running; then state="up $(head -1 "$PG_DATA/postmaster.pid")"; else state=down; fi
  row postgres "$state" "$CARELOG_DATABASE_URL" "$(rel "$LOGS/postgres.log")"
  if pid="$(live_pid redis)"; then state="up $pid"; else state=down; fi
  row redis "$state" "$REDIS_ADDRESS_URL (password)" "$(rel "$LOGS/redis.log")"
  if pid="$(live_pid kafka)"; then state="up $pid"; else state=down; fi
  row kafka "$state" "$CARELOG_KAFKA_BOOTSTRAP (SASL SCRAM-SHA-512)" "$(rel "$LOGS/kafka.log")"
  [[ ${1:-} == infra ]] && return 0
  load_services
  local i host port
  for i in "${!SVC_NAMES[@]}"; do
    if pid="$(live_pid "${SVC_NAMES[$i]}")"; then
      if http_ok "${SVC_URLS[$i]}"; then state="up $pid"; else state="starting $pid"; fi
    elif read -r host port <<<"$(url_hostport "${SVC_URLS[$i]}")" && port_open "$host" "$port"; then
      state="port taken"  # by a process this stack did not start
    else state=down; fi
    row "${SVC_NAMES[$i]}" "$state" "${SVC_URLS[$i]}" "$(rel "$LOGS/${SVC_NAMES[$i]}.log")"
  done
  if pid="$(live_pid gateway)"; then state="up $pid"; else state=down; fi
  row gateway "$state" "$GATEWAY_URL" "$(rel "$LOGS/gateway.log")"
}

# --- Commands -------------------------------------------------------------------------------
# Before starting anything: every port a not-yet-running component needs must be free,
# so a conflict fails fast and leaves nothing half-started.
preflight() {
  pg_running || require_free_port postgres "$PG_HOST" "$PG_PORT"
  live_pid redis >/dev/null || require_free_port redis "$REDIS_HOST" "$REDIS_PORT"
  if ! live_pid kafka >/dev/null; then
    require_free_port kafka "$KAFKA_HOST" "$KAFKA_PORT"
    require_free_port "kafka controller" "$KAFKA_HOST" "$KAFKA_CONTROLLER_PORT" "KAFKA_CONTROLLER_PORT"
  fi
  [[ ${1:-} == services ]] || return 0
  load_services
  local i host port
  for i in "${!SVC_NAMES[@]}"; do
    live_pid "${SVC_NAMES[$i]}" >/dev/null && continue
    read -r host port <<<"$(url_hostport "${SVC_URLS[$i]}")"
    require_free_port "${SVC_NAMES[$i]}" "$host" "$port" "the service table of ops/local/stack.sh"
  done
  live_pid gateway >/dev/null || require_free_port gateway 127.0.0.1 "$GATEWAY_PORT" "CARELOG_GATEWAY_PORT"
}

cmd_infra() {
  prepare_dirs
  lock_stack
  preflight "${1:-}"
  run_install
  make_credentials
  local t0=$SECONDS
  kafka_launch
  pg_up
  redis_up
  kafka_wait
  db_migrate
  say "infra ready in $((SECONDS - t0))s"
}

cmd_up() {
  cmd_infra services
  services_up
  gateway_up
}

cmd_down() {
  prepare_dirs
  lock_stack
  services_down
  stop_named kafka "$STOP_TIMEOUT"
  stop_named redis 10
  pg_down
}

cmd_reset() {
  cmd_down
  say "deleting stack data under $(rel "$STACK") (keeping the Kafka jars in $(rel "$KAFKA_LIBS"))"
  # The audit spool goes with the database its records were for; the captured mail with
  # the patients it was sent to.
  rm -rf "$STACK/pg" "$REDIS_DIR" "$KAFKA_DATA" "$STACK"/kafka/data.before-scram-* "$KAFKA_CONF" "$LOGS" \
    "$STACK/audit-spool" "$STACK/mail"
  find "$RUN" -name '*.pid' -delete 2>/dev/null || true
}

cmd_status() {
  prepare_dirs
  print_table
  pg_running && live_pid redis >/dev/null && live_pid kafka >/dev/null || return 1
}

cmd_logs() {
  prepare_dirs
  local files=() name
  load_services
  for name in "${INFRA[@]}" "${SVC_NAMES[@]}"; do
    touch "$LOGS/$name.log"
    files+=("$LOGS/$name.log")
  done
  for name in "$LOGS"/*.log; do
    [[ " ${files[*]} " == *" $name "* ]] || files+=("$name")
  done
  exec tail -n 20 -F "${files[@]}"
}

usage() {
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  up) cmd_up; print_table ;;
  infra) cmd_infra; print_table infra ;;
  down) cmd_down ;;
  reset) cmd_reset ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  env) _stack_print_env ;;
  kafka-run)
    shift
    (($#)) || die "usage: stack.sh kafka-run CLASS [ARGS...]"
    compgen -G "$KAFKA_LIBS/*.jar" >/dev/null || die "no Kafka jars in $(rel "$KAFKA_LIBS") (run ops/local/install.sh)"
    exec java -Xmx256m -Dlog4j.configuration="file:$ROOT/ops/local/kafka/tools-log4j.properties" \
      -cp "$KAFKA_LIBS/*" "$@"
    ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
