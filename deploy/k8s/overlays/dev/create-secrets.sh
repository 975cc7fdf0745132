#!/usr/bin/env bash
# Create the Secrets the dev overlay references, with fresh random passwords.
#
#   ./create-secrets.sh [NAMESPACE]     create whatever is missing in NAMESPACE (default relaygate-dev)
#   DRY_RUN=1 ./create-secrets.sh       print the Secret manifests instead; needs no cluster
#
# Secrets that already exist are left alone, and the passwords of an existing relaygate-dev-infra are
# reused for the DSNs: PostgreSQL keeps the password it was initialised with.
# Env: KUBECTL (default: kubectl).
set -euo pipefail

NS=${1:-relaygate-dev}
KUBECTL=${KUBECTL:-kubectl}
DRY_RUN=${DRY_RUN:-}

rand_hex() { od -An -vtx1 -N"$1" /dev/urandom | tr -d ' \n'; }

exists() { [ -z "$DRY_RUN" ] && "$KUBECTL" -n "$NS" get secret "$1" >/dev/null 2>&1; }

read_key() { "$KUBECTL" -n "$NS" get secret "$1" -o "jsonpath={.data.$2}" | base64 -d; }

# secret NAME KEY=VALUE...
secret() {
  local name=$1 kv
  shift
  if exists "$name"; then
    echo "secret/$name exists; left as it is" >&2
    return
  fi
  local args=()
  for kv in "$@"; do args+=("--from-literal=$kv"); done
  if [ -n "$DRY_RUN" ]; then
    echo "---"
    "$KUBECTL" create secret generic "$name" -n "$NS" "${args[@]}" --dry-run=client -o yaml
  else
    "$KUBECTL" create secret generic "$name" -n "$NS" "${args[@]}"
  fi
}

if [ -z "$DRY_RUN" ] && ! "$KUBECTL" get namespace "$NS" >/dev/null 2>&1; then
  "$KUBECTL" create namespace "$NS"
fi

if exists relaygate-dev-infra; then
  postgres_password=$(read_key relaygate-dev-infra postgres-password)
  redis_password=$(read_key relaygate-dev-infra redis-password)
else
  postgres_password=$(rand_hex 16)
  redis_password=$(rand_hex 16)
fi

# Used by the in-cluster PostgreSQL and Redis themselves.
secret relaygate-dev-infra \
  "postgres-password=$postgres_password" \
  "replication-password=$(rand_hex 16)" \
  "redis-password=$redis_password"

# Read by the relaygate services: the same keys a production deployment provides.
secret relaygate-database \
  "primary-url=postgresql://relaygate:$postgres_password@postgres-primary:5432/relaygate" \
  "replica-urls=postgresql://relaygate:$postgres_password@postgres-replica:5432/relaygate"
secret relaygate-redis "url=redis://:$redis_password@redis:6379/0"
secret relaygate-auth \
  "key-pepper=$(rand_hex 32)" \
  "admin-token-secret=$(rand_hex 32)" \
  "bootstrap-admin-key=rg-$(rand_hex 6)-$(rand_hex 16)"

if [ -z "$DRY_RUN" ]; then
  echo "admin key: kubectl -n $NS get secret relaygate-auth -o jsonpath='{.data.bootstrap-admin-key}' | base64 -d" >&2
fi
