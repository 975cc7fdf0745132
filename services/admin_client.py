"""``relaygate admin ...``: the command line over the relay's admin HTTP API.

Credentials: ``--url`` (or ``RELAYGATE_ADMIN_URL``, default ``http://127.0.0.1:8080``) and an admin key
(``--key``, ``RELAYGATE_ADMIN_KEY``, or the ``admin-key`` file that ``relaygate up`` keeps in its data
directory). The key is exchanged for a short-lived admin token before each command. Answers print as
tables (:mod:`services.admin_tables`), or as the API's JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from services.admin_tables import render


class AdminError(Exception):
    pass


class AdminClient:
    def __init__(self, url: str, admin_key: str) -> None:
        self._url = url.rstrip("/")
        self._key = admin_key
        self._client = httpx.Client(base_url=self._url, timeout=30)

    def __enter__(self) -> AdminClient:
        token = self._request("POST", "/admin/v1/tokens", auth=self._key)["token"]
        self._client.headers["authorization"] = f"Bearer {token}"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._client.close()

    def _request(self, method: str, path: str, *, auth: str | None = None, **kwargs: Any) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {auth}"} if auth else None
        response = self._client.request(method, path, headers=headers, **kwargs)
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {"error": {"message": response.text}}
        if response.is_error:
            message = body.get("error", {}).get("message", response.text)
            raise AdminError(f"{method} {path} failed with {response.status_code}: {message}")
        return body

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self._request("GET", path, params={k: v for k, v in params.items() if v not in (None, "")})

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._request("POST", path, json=body or {})

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("PUT", path, json=body)

    def delete(self, path: str) -> dict[str, Any]:
        return self._request("DELETE", path)


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _headers(pairs: list[str] | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise AdminError(f"--header takes NAME=VALUE (got {name.strip() or pair[:20]!r}=...)")
        headers[name.strip()] = value
    return headers


def _updated_channel(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    """The channel as listed with the options given changed. Its credentials come back masked, which
    the catalog reads as "keep the stored value", so an update never needs the secret again."""
    listed = client.get("/admin/v1/channels").get("channels", [])
    channel = next((c for c in listed if c.get("channel_id") == args.channel_id), None)
    if channel is None:
        raise AdminError(f"no channel {args.channel_id!r}")
    changes = {
        "name": args.name,
        "base_url": args.base_url,
        "type": args.type,
        "api_version": args.api_version,
        "models": _csv(args.models) if args.models is not None else None,
        "model_map": _headers(args.model_map) if args.model_map is not None else None,
        "api_key": args.api_key,
        "priority": args.priority,
        "weight": args.weight,
        "enabled": args.enabled == "true" if args.enabled is not None else None,
    }
    return {**channel, **{name: value for name, value in changes.items() if value is not None}}


def _limits(args: argparse.Namespace) -> dict[str, int]:
    names = ("rpm", "tpm", "max_concurrency", "daily_budget_micros", "monthly_budget_micros")
    return {name: getattr(args, name) for name in names if getattr(args, name, None)}


def run_command(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    """Perform one admin command; returns the API's JSON answer."""
    match (args.resource, args.action):
        case ("users", "create"):
            return client.post(
                "/admin/v1/users",
                {"name": args.name, "email": args.email or "", "admin": args.admin, "limits": _limits(args)},
            )
        case ("users", "list"):
            return client.get("/admin/v1/users", limit=args.limit)
        case ("keys", "create"):
            body: dict[str, Any] = {
                "user_id": args.user,
                "name": args.name or "",
                "allowed_models": _csv(args.models),
                "allowed_cidrs": _csv(args.cidrs),
                "expires_at": args.expires_at,
                "limits": _limits(args),
            }
            return client.post("/admin/v1/keys", body)
        case ("keys", "list"):
            return client.get("/admin/v1/keys", user_id=args.user, limit=args.limit)
        case ("keys", "revoke"):
            return client.post(f"/admin/v1/keys/{args.key_id}/revoke")
        case ("keys", "rotate"):
            return client.post(f"/admin/v1/keys/{args.key_id}/rotate")
        case ("budgets", "set"):
            return client.put(
                f"/admin/v1/budgets/{args.scope}/{args.scope_id}/{args.period}",
                {"limit_micros": args.limit_micros},
            )
        case ("budgets", "show"):
            return client.get(f"/admin/v1/budgets/{args.scope}/{args.scope_id}", consistent="true")
        case ("balance", _):
            return client.get(f"/admin/v1/users/{args.user}/balance", consistent="true")
        case ("topup", _):
            return client.post(
                f"/admin/v1/users/{args.user}/topups",
                {
                    "amount_micros": args.amount_micros,
                    "reason": args.reason,
                    "idempotency_key": args.idempotency_key,
                },
            )
        case ("prices", "set"):
            return client.put(
                f"/admin/v1/prices/{args.model}",
                {
                    "input_per_mtok": args.input,
                    "output_per_mtok": args.output,
                    "cached_input_per_mtok": args.cached_input,
                    "cache_write_per_mtok": args.cache_write,
                    "reasoning_per_mtok": args.reasoning,
                    "per_request": args.per_request,
                    "per_image": args.per_image,
                    "default_max_output_tokens": args.default_max_output,
                },
            )
        case ("prices", "list"):
            return client.get("/admin/v1/prices")
        case ("channels", "add"):
            return client.post(
                "/admin/v1/channels",
                {
                    "name": args.name,
                    "base_url": args.base_url,
                    "api_key": args.api_key or "",
                    "headers": _headers(args.header),
                    "models": _csv(args.models),
                    "model_map": _headers(args.model_map),
                    "type": args.type,
                    "api_version": args.api_version,
                    "priority": args.priority,
                    "weight": args.weight,
                    "enabled": True,
                },
            )
        case ("channels", "update"):
            return client.post("/admin/v1/channels", _updated_channel(client, args))
        case ("channels", "list"):
            return client.get("/admin/v1/channels")
        case ("channels", "delete"):
            return client.delete(f"/admin/v1/channels/{args.channel_id}")
        case ("logs", _):
            return client.get(
                "/admin/v1/logs", user_id=args.user, key_id=args.key_id, model=args.model, limit=args.limit
            )
    raise AdminError(f"unknown command {args.resource} {args.action}")


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    parser.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    parser.add_argument("--max-concurrency", type=int, default=0, help="requests at once (0: no limit)")
    # Written as quota budgets by the admin API, like `budgets set`.
    for period in ("daily", "monthly"):
        parser.add_argument(
            f"--{period}-budget-micros",
            type=int,
            default=0,
            help=f"a {period} spending cap in micro-units (same as `budgets set`)",
        )


def _add_channel_type_flags(parser: argparse.ArgumentParser, *, update: bool) -> None:
    types = ("openai", "azure-openai", "anthropic", "gemini")
    parser.add_argument(
        "--type", default=None if update else "openai", choices=types, help="the provider's API"
    )
    parser.add_argument(
        "--api-version", default=None if update else "", help="azure-openai channels: the api-version to send"
    )
    parser.add_argument(
        "--model-map",
        action="append",
        metavar="MODEL=UPSTREAM",
        help="public model name to the provider's (azure-openai: the deployment); repeatable"
        + ("; replaces the map" if update else ""),
    )


def add_parser(commands: Any) -> None:
    """Register ``admin`` and its sub-commands on the top-level ``relaygate`` parser."""
    admin = commands.add_parser(
        "admin",
        help="manage users, keys, credit, prices and channels",
        description="The admin HTTP API from the shell. Answers print as tables (money in units and "
        "micro-units); --json prints them as the API sent them.",
    )
    admin.add_argument(
        "--url",
        default=os.environ.get("RELAYGATE_ADMIN_URL", "http://127.0.0.1:8080"),
        help="the relay's base URL (RELAYGATE_ADMIN_URL; default http://127.0.0.1:8080)",
    )
    admin.add_argument(
        "--key",
        default=os.environ.get("RELAYGATE_ADMIN_KEY", ""),
        help="an admin API key (RELAYGATE_ADMIN_KEY; default: the key file in --data-dir)",
    )
    admin.add_argument("--data-dir", default=".relaygate", help="where `relaygate up` keeps the admin key")
    admin.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    resources = admin.add_subparsers(dest="resource", required=True, metavar="RESOURCE")

    users = resources.add_parser("users", help="create and list users").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = users.add_parser("create", help="create a user (with limits and budgets)")
    create.add_argument("--name", required=True, help="display name")
    create.add_argument("--email", help="contact address")
    create.add_argument("--admin", action="store_true", help="may use the admin API")
    _add_limit_flags(create)
    users.add_parser("list", help="list users").add_argument(
        "--limit", type=int, default=100, help="at most this many (default 100)"
    )

    keys = resources.add_parser("keys", help="create, list, revoke and rotate API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", help="create a key; prints it once")
    create.add_argument("--user", required=True, help="the owning user's id")
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--models", help="comma-separated names or patterns (default: all)")
    create.add_argument("--cidrs", help="comma-separated addresses or CIDR blocks (default: anywhere)")
    create.add_argument("--expires-at", type=int, default=0, help="unix seconds (0: never)")
    _add_limit_flags(create)
    listing = keys.add_parser("list", help="list keys")
    listing.add_argument("--user", help="only this user's keys")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    keys.add_parser("revoke", help="revoke a key at once").add_argument("key_id", help="the key's id")
    keys.add_parser("rotate", help="new secret for a key; prints it once").add_argument(
        "key_id", help="the key's id"
    )

    budgets = resources.add_parser("budgets", help="spending caps of keys and users").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    setting = budgets.add_parser("set", help="a spending cap per calendar day or month; 0 removes it")
    setting.add_argument("scope", choices=("key", "user"), help="a key's or a user's budget")
    setting.add_argument("scope_id", help="the key's or user's id")
    setting.add_argument("period", choices=("day", "month"), help="the calendar window")
    setting.add_argument("limit_micros", type=int, help="the cap in micro-units (0 removes it)")
    showing = budgets.add_parser("show", help="caps, and the current windows' spent and held amounts")
    showing.add_argument("scope", choices=("key", "user"), help="a key's or a user's budgets")
    showing.add_argument("scope_id", help="the key's or user's id")

    resources.add_parser("balance", help="a user's balance, held and available credit").add_argument(
        "user", help="the user's id"
    )
    topup = resources.add_parser("topup", help="add credit (negative to remove)")
    topup.add_argument("user", help="the user's id")
    topup.add_argument("amount_micros", type=int, help="micro-units (1,000,000 = one unit)")
    topup.add_argument("--reason", default="", help="recorded in the ledger")
    topup.add_argument("--idempotency-key", default="", help="a repeat with the same key adds nothing")

    prices = resources.add_parser("prices", help="the price book").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    setting = prices.add_parser("set", help="set a model's price (micro-units per million tokens)")
    setting.add_argument("model", help="the public model name")
    setting.add_argument("--input", type=int, required=True, help="per million prompt tokens")
    setting.add_argument("--output", type=int, required=True, help="per million completion tokens")
    setting.add_argument("--cached-input", type=int, default=0, help="per million cached prompt tokens")
    setting.add_argument("--cache-write", type=int, default=0, help="cache writes (0: input price)")
    setting.add_argument("--reasoning", type=int, default=0, help="reasoning tokens (0: the output price)")
    setting.add_argument("--per-request", type=int, default=0, help="per request, on top of tokens")
    setting.add_argument("--per-image", type=int, default=0, help="per generated image")
    setting.add_argument(
        "--default-max-output", type=int, default=0, help="output cap held when a request sets none"
    )
    prices.add_parser("list", help="every model's current price")

    channels = resources.add_parser("channels", help="upstream channels").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = channels.add_parser("add", help="register an upstream channel")
    add.add_argument("--name", required=True, help="a unique name")
    add.add_argument(
        "--base-url",
        required=True,
        help="with /v1 (openai, anthropic) or /v1beta (gemini); azure-openai: the resource root",
    )
    _add_channel_type_flags(add, update=False)
    add.add_argument("--models", required=True, help="comma-separated public model names it serves")
    add.add_argument("--api-key", help="stored write-only: answers and listings show it masked")
    add.add_argument(
        "--header",
        action="append",
        metavar="NAME=VALUE",
        help="sent with every request to the channel (repeatable); secret-looking values are shown masked",
    )
    add.add_argument("--priority", type=int, default=0, help="lower is tried first (default 0)")
    add.add_argument("--weight", type=int, default=1, help="share among equal priorities (default 1)")
    update = channels.add_parser("update", help="change the given fields of a channel, keep the rest")
    update.add_argument("channel_id", help="the channel's id")
    update.add_argument("--name", help="a new name")
    update.add_argument("--base-url", help="a new base URL")
    _add_channel_type_flags(update, update=True)
    update.add_argument("--models", help="comma-separated; replaces the list")
    update.add_argument("--api-key", help="a new credential (stored write-only)")
    update.add_argument("--priority", type=int, help="lower is tried first")
    update.add_argument("--weight", type=int, help="share among equal priorities")
    update.add_argument("--enabled", choices=("true", "false"), help="take the channel in or out of use")
    channels.add_parser("list", help="every channel (credentials masked)")
    channels.add_parser("delete", help="remove a channel").add_argument("channel_id", help="the channel's id")

    logs = resources.add_parser("logs", help="request logs, newest first")
    logs.add_argument("--user", help="only this user's requests")
    logs.add_argument("--key-id", help="only this key's requests")
    logs.add_argument("--model", help="only this model's requests")
    logs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    for parser in (resources.choices["balance"], topup, logs):
        parser.set_defaults(action="")
    admin.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    admin_key = args.key
    if not admin_key:
        path = Path(args.data_dir) / "admin-key"
        if not path.exists():
            print(
                "no admin key: pass --key, set RELAYGATE_ADMIN_KEY, or run from `relaygate up`'s directory",
                file=sys.stderr,
            )
            return 2
        admin_key = path.read_text().strip()
    try:
        with AdminClient(args.url, admin_key) as client:
            answer = run_command(client, args)
        print(json.dumps(answer, indent=2) if args.json else render(answer))
    except (AdminError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
