#!/usr/bin/env bash
# The project's test command: machine setup, lint, format check, type check, then pytest.
#
#   bash tests/run.sh [pytest args...]
#
# Stops at the first failing step and exits with that step's code. Every non-zero pytest code counts,
# including 5 ("no tests ran"): a suite that silently collects nothing must not pass.
# With CI set (CI=true), a missing server binary fails the backing-service tests instead of skipping them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ -n "${CI:-}" ]; then
  export RELAYGATE_REQUIRE_INFRA=1
fi

now_ms() { local us=${EPOCHREALTIME/./}; echo $((10#$us / 1000)); }
seconds() { printf '%d.%02d' $(($1 / 1000)) $(($1 % 1000 / 10)); }

RUN_START=$(now_ms)

# step NAME COMMAND...: run COMMAND under a header; on failure, stop everything with its exit code.
step() {
  local name=$1
  shift
  local start rc=0
  start=$(now_ms)
  printf '\n==> %s  [at %ss]\n' "$name" "$(seconds $((start - RUN_START)))"
  "$@" || rc=$?
  local took
  took=$(seconds $(($(now_ms) - start)))
  if ((rc != 0)); then
    printf '==> %s FAILED with exit code %d after %ss\n' "$name" "$rc" "$took" >&2
    exit "$rc"
  fi
  printf '==> %s ok in %ss\n' "$name" "$took"
}

step "setup" bash tests/infra/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
step "ruff check" ruff check .
step "ruff format --check" ruff format --check .
step "mypy services devinfra bench tests" mypy services devinfra bench tests
step "pytest" pytest "$@"

printf '\n==> all steps passed in %ss\n' "$(seconds $(($(now_ms) - RUN_START)))"
