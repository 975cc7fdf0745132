"""The admin API's OpenAPI document: served with FastAPI's interactive docs, it lists every admin route
with its method and the scope its handler checks, and describes bodies and answers by their messages."""

from __future__ import annotations

import ast
import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.testclient import TestClient

from services.common.scopes import ADMIN_READ, ADMIN_WRITE
from services.relay.edge.http import admin
from services.relay.edge.http.admin_docs import API_KEY, DOCS_URL, OPENAPI_URL, OPERATIONS, document
from services.relay.edge.http.app import create_app
from services.relay.settings import RelaySettings

_SCOPES = {"READ": ADMIN_READ, "WRITE": ADMIN_WRITE, "ADMIN_READ": ADMIN_READ, "ADMIN_WRITE": ADMIN_WRITE}


def admin_routes() -> list[APIRoute]:
    return [route for route in admin.router.routes if isinstance(route, APIRoute)]


def enforced_scope(route: APIRoute) -> str:
    """The scope the handler passes to ``require_admin`` (read from its source), or API_KEY when it
    takes none (the token exchange, whose bearer is an API key)."""
    tree = ast.parse(inspect.getsource(route.endpoint))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "require_admin"
            and isinstance(node.args[-1], ast.Name)
        ):
            return _SCOPES[node.args[-1].id]
    return API_KEY


def spec() -> dict[str, Any]:
    app = FastAPI()
    app.include_router(admin.router)
    return document(app)


def test_every_admin_route_is_documented_with_its_method_and_scope() -> None:
    paths = spec()["paths"]
    served: set[tuple[str, str]] = set()
    for route in admin_routes():
        assert route.methods is not None, f"{route.path_format} has no methods"
        for method in route.methods:
            key = (method.lower(), route.path_format)
            served.add(key)
            assert key in OPERATIONS, f"{method} {route.path_format} is missing from admin_docs.OPERATIONS"
            operation = paths[route.path_format][method.lower()]
            assert operation["x-required-scope"] == enforced_scope(route), key
            assert OPERATIONS[key].scope == enforced_scope(route), key
    assert set(OPERATIONS) == served, sorted(set(OPERATIONS) - served)


def test_bodies_and_answers_are_the_messages() -> None:
    document = spec()
    schemas = document["components"]["schemas"]
    create_user = document["paths"]["/admin/v1/users"]["post"]
    body = create_user["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/relaygate.auth.v1.CreateUserRequest"}
    assert {"name", "email", "limits"} <= set(schemas["relaygate.auth.v1.CreateUserRequest"]["properties"])
    topup = document["paths"]["/admin/v1/users/{user_id}/topups"]["post"]
    assert "201" in topup["responses"]
    assert topup["security"] == [{"adminToken": [ADMIN_WRITE]}]
    listing = document["paths"]["/admin/v1/logs"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"key_id", "user_id", "model", "cursor"}
    # Every reference resolves.
    text = str(document)
    for name in schemas:
        assert isinstance(schemas[name], dict) and schemas[name], name
    for ref in {part.split("'")[0] for part in text.split("#/components/schemas/")[1:]}:
        assert ref in schemas, ref


def test_the_relay_serves_the_document_and_the_interactive_docs() -> None:
    client = TestClient(create_app(RelaySettings()))
    served = client.get(OPENAPI_URL)
    assert served.status_code == 200
    assert served.json()["paths"]["/admin/v1/performance"]["get"]["x-required-scope"] == ADMIN_READ
    docs = client.get(DOCS_URL)
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text and OPENAPI_URL in docs.text
