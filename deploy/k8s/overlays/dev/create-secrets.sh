#!/usr/bin/env bash
# Create the Secrets the dev overlay references, with fresh random passwords.
#
#   ./create-secrets.sh [NAMESPACE]     create whatever is missing in NAMESPACE (default relaygate-dev)
#   DRY_RUN=1 ./create-secrets.sh       print the Secret manifests instead; needs no cluster
#
# Secrets that already exist are left alone, and the passwords of an existing relaygate-dev-infra are
# reused for the DSNs: PostgreSQL keeps the password it was initialised with. The services' certificates
# (relaygate-<service>-tls, cert-manager's keys) are issued together by a throwaway CA (openssl), and
# only when none of them exists: certificates of two CAs would not trust each other.
# Env: KUBECTL (default: kubectl), OPENSSL (default: openssl).
set -euo pipefail

NS=${1:-relaygate-dev}
KUBECTL=${KUBECTL:-kubectl}
OPENSSL=${OPENSSL:-openssl}
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

# The certificate of each service, for mutual TLS between them (see ../../README.md); the CA key is
# dropped, so new certificates mean issuing all of them again (delete the four Secrets first).
TLS_SERVICES=(relay auth quota logger)
tls_exists=""
for service in "${TLS_SERVICES[@]}"; do
  if exists "relaygate-$service-tls"; then tls_exists=1; fi
done
if [ -n "$tls_exists" ]; then
  echo "relaygate-*-tls exist; left as they are" >&2
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  "$OPENSSL" req -x509 "${ec[@]}" -keyout "$work/ca.key" -out "$work/ca.crt" -days 3650 \
    -subj "/CN=relaygate dev CA" -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  for service in "${TLS_SERVICES[@]}"; do
    "$OPENSSL" req "${ec[@]}" -keyout "$work/$service.key" -out "$work/$service.csr" \
      -subj "/CN=$service" 2>/dev/null
    names="DNS:$service.relaygate.internal"
    if [ "$service" = relay ]; then
      # The gRPC front's clients check the name they dialled: the Service's, in every form.
      svc="relaygate-relay"
      names="$names,DNS:$svc,DNS:$svc.$NS.svc,DNS:$svc.$NS.svc.cluster.local"
    fi
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$names" >"$work/$service.ext"
    "$OPENSSL" x509 -req -in "$work/$service.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
      -CAcreateserial -days 365 -extfile "$work/$service.ext" -out "$work/$service.crt" 2>/dev/null
    args=(--type=kubernetes.io/tls "--from-file=tls.crt=$work/$service.crt"
      "--from-file=tls.key=$work/$service.key" "--from-file=ca.crt=$work/ca.crt")
    if [ -n "$DRY_RUN" ]; then
      echo "---"
      "$KUBECTL" create secret generic "relaygate-$service-tls" -n "$NS" "${args[@]}" --dry-run=client -o yaml
    else
      "$KUBECTL" create secret generic "relaygate-$service-tls" -n "$NS" "${args[@]}"
    fi
  done
fi

if [ -z "$DRY_RUN" ]; then
  echo "admin key: kubectl -n $NS get secret relaygate-auth -o jsonpath='{.data.bootstrap-admin-key}' | base64 -d" >&2
fi
