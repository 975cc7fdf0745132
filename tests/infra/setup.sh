#!/usr/bin/env bash
# Prepare a machine to run the test suite: server binaries (apt), the project virtualenv (pip) and the
# Apache Kafka jars (Maven Central, cached in ~/.cache/relaygate/kafka-<version>).
#
# Idempotent: every step checks first and skips what is already in place, so a second run takes well
# under a second. Needs root only when a package is actually missing. Works from any cwd.
#
# Env:
#   PYTHON  interpreter used to create .venv (default: python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

START=$SECONDS
log() { printf '[setup %3ds] %s\n' "$((SECONDS - START))" "$*"; }

# --- server binaries --------------------------------------------------------------------------------

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
# Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<major>/bin.
# The distribution's default major version (15 on Debian 12); the harness finds whichever is installed.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
# The benchmark harness (and its smoke test) drives load with wrk.
command -v wrk >/dev/null 2>&1 || packages+=(wrk)
# Apache Kafka runs on the JVM (4.x needs Java 17+); Maven fetches its jars once.
command -v java >/dev/null 2>&1 || packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || packages+=(maven)
# The console's browser tests (tests/console) drive Debian's chromium through Playwright.
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
# The monitoring component's rules are checked and unit-tested with promtool (Debian's prometheus).
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)

if ((${#packages[@]})); then
  if [ "$(id -u)" != 0 ]; then
    log "missing packages: ${packages[*]}; run this script as root once to install them" >&2
    exit 1
  fi
  log "apt-get update"
  apt-get update -qq
  log "apt-get install ${packages[*]}"
  # policy-rc.d on these machines keeps apt from starting the services; the test harness starts its own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  log "installed ${packages[*]}"
else
  log "redis-server, postgresql, wrk, java, maven, chromium and promtool already installed"
fi

# --- virtualenv -------------------------------------------------------------------------------------

if [ ! -f pyproject.toml ]; then
  log "no pyproject.toml yet; skipping the virtualenv step"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
fi

# Keyed on the pyproject contents, so editing dependencies triggers a reinstall and nothing else does.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ]; then
  log "virtualenv up to date ($stamp)"
else
  log "pip install -e '.[dev]'"
  # This machine's pip config lists local index directories that need not exist; pip warns once per
  # package about each. Drop that noise, keep every other message.
  .venv/bin/pip install -q -e '.[dev]' 2> >(grep -v "^WARNING: Location 'file:" >&2 || true)
  rm -f .venv/.installed-*
  touch "$stamp"
  log "virtualenv ready"
fi

# --- Apache Kafka -----------------------------------------------------------------------------------

# The jars live outside the tree, like the venv they survive a clean checkout; a second run is a no-op.
log "Apache Kafka jars: $(.venv/bin/python -m devinfra.kafka fetch)"

log "done"
