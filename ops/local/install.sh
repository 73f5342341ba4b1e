#!/usr/bin/env bash
# Install everything the local carelog stack needs. Idempotent: a second run only
# checks, and takes about a second.
#
#   Debian packages  redis-server, haproxy, postgresql-15 (+ contrib), JDK 17, Maven, curl,
#                    chromium (headless, for the docs pages' browser test)
#   uv               `pip install uv` when missing
#   Python deps      `uv sync --frozen` (plain `uv sync` when there is no uv.lock)
#   Kafka 3.9.1      broker + tools + logging backend from Maven Central into .stack/kafka/libs
#   kustomize        renders ops/k8s (tests/deploy): `go install` into .stack/bin, when Go is here
#
# Usage: ops/local/install.sh [--no-python]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK="$ROOT/.stack"
KAFKA_LIBS="$STACK/kafka/libs"
KAFKA_POM="$ROOT/ops/local/kafka/pom.xml"
WITH_PYTHON=1
[[ "${1:-}" == "--no-python" ]] && WITH_PYTHON=0

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

pkg_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# --- Debian packages ---------------------------------------------------------
install_debian_packages() {
  local want=() p
  pkg_installed redis-server || want+=(redis-server)
  pkg_installed haproxy || want+=(haproxy)
  pkg_installed postgresql-15 || want+=(postgresql-15)
  # Debian ships contrib (pg_trgm, ...) inside postgresql-15; the
  # postgresql-contrib metapackage pulls it in where a distro splits it out.
  [[ -f /usr/share/postgresql/15/extension/pg_trgm.control ]] || pkg_installed postgresql-contrib || want+=(postgresql-contrib)
  command -v java >/dev/null 2>&1 || want+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || want+=(maven)
  command -v curl >/dev/null 2>&1 || want+=(curl)
  command -v wrk >/dev/null 2>&1 || want+=(wrk)  # the load tool of `make bench`
  command -v runuser >/dev/null 2>&1 || want+=(util-linux)
  pkg_installed chromium || want+=(chromium)  # the docs pages' browser test (tests/e2e/test_docs_page.py)
  ((${#want[@]})) || { log "debian packages: ok"; return 0; }

  log "debian packages: installing ${want[*]}"
  # Never let a package start its own system service (it would take 5432/6379):
  # the stack runs its own instances under .stack/. Docker-style images already
  # have a policy-rc.d that says "no"; add a temporary one where there is none.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    added_policy=1
  fi
  if ((added_policy)); then
    # shellcheck disable=SC2064
    trap "as_root rm -f '$policy'" EXIT
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  for p in "${want[@]}"; do
    case $p in
      openjdk-*|util-linux) ;;
      *) pkg_installed "$p" || die "package $p did not install" ;;
    esac
  done
  log "debian packages: installed ${want[*]}"
}

# --- uv + Python environment ---------------------------------------------------
install_python() {
  if ! command -v uv >/dev/null 2>&1; then
    log "uv: installing with pip"
    if command -v pip >/dev/null 2>&1; then pip install -q uv
    elif command -v pip3 >/dev/null 2>&1; then pip3 install -q uv
    else python3 -m pip install -q uv
    fi
    hash -r
    command -v uv >/dev/null 2>&1 || die "uv installed but not on PATH ($PATH)"
  fi
  cd "$ROOT"
  if [[ -f uv.lock ]]; then
    uv sync --frozen --quiet
  else
    log "uv.lock missing: running plain uv sync"
    uv sync --quiet
  fi
  log "python env: ok ($(uv --version))"
}

# --- Kafka broker from Maven Central ---------------------------------------------
install_kafka() {
  local stamp="$KAFKA_LIBS/.pom.sha256" want
  want="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
  if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null; then
    log "kafka libs: ok ($KAFKA_LIBS)"
    return 0
  fi
  log "kafka libs: fetching with maven (cached in ~/.m2 after the first time)"
  local tmp="$KAFKA_LIBS.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # (sed: Debian's Maven 3.8 prints stray ANSI resets even in batch mode)
  if ! mvn -B -q -f "$KAFKA_POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2; then
    rm -rf "$tmp"
    die "maven could not fetch the Kafka broker (see output above)"
  fi
  echo "$want" > "$tmp/.pom.sha256"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  log "kafka libs: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS"
}

# --- kustomize from the Go module proxy -------------------------------------------
# Renders ops/k8s for tests/deploy/test_k8s.py. Pinned: later releases need a newer Go.
KUSTOMIZE_VERSION=v5.7.1
install_kustomize() {
  local bin="$STACK/bin/kustomize"
  if [[ -x $bin ]] && "$bin" version 2>/dev/null | grep -qF "$KUSTOMIZE_VERSION"; then
    log "kustomize: ok ($bin)"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    log "kustomize: skipped (no Go toolchain; tests/deploy then uses kubectl kustomize if present)"
    return 0
  fi
  log "kustomize: go install $KUSTOMIZE_VERSION into $STACK/bin"
  GOBIN="$STACK/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" ||
    die "go install of kustomize $KUSTOMIZE_VERSION failed"
}

mkdir -p "$STACK"
install_debian_packages
install_kustomize
((WITH_PYTHON)) && install_python
install_kafka
