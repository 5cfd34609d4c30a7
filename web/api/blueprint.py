"""ApiBlueprint: routes that carry their OpenAPI description, and the request and
response helpers every area of the JSON API shares.

Each route is declared with :meth:`ApiBlueprint.op`, which registers the
Flask view and records its OpenAPI operation (summary, parameters, request
body, responses, the scope it needs) in one place; :mod:`web.api.openapi`
builds ``/v1/openapi.json`` from those records and a test checks that every
``/v1`` route of the app is in the document and the other way round.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Blueprint, request

from vault.errors import InvalidInput
from vault.handles import MAX_NAME, RESERVED
from web.errors import UnsupportedMediaType


@dataclass
class Operation:
    rule: str  # Flask rule, relative to /v1
    method: str
    operation_id: str
    summary: str
    tag: str
    scope: str | None  # API scope needed (None: any authenticated caller)
    public: bool = False
    description: str = ""
    parameters: list[dict] = field(default_factory=list)
    query: list[dict] = field(default_factory=list)
    body: dict | None = None  # OpenAPI requestBody
    responses: dict = field(default_factory=dict)


class ApiBlueprint(Blueprint):
    """A blueprint whose routes carry their OpenAPI description."""

    def __init__(self, name: str, import_name: str, *, tag: str) -> None:
        super().__init__(name, import_name)
        self.tag = tag
        self.operations: list[Operation] = []

    def op(self, rule: str, method: str, *, summary: str, scope: str | None,
           responses: dict, public: bool = False, description: str = "",
           query: list[dict] | None = None, body: dict | None = None,
           path_params: dict[str, dict] | None = None) -> Callable:
        def deco(fn: Callable) -> Callable:
            names = re.findall(r"<(?:[a-z]+:)?([a-z_]+)>", rule)
            params = [{"name": n, "in": "path", "required": True,
                       "schema": (path_params or {}).get(n, {"type": "string"})}
                      for n in names]
            self.operations.append(Operation(
                rule, method, fn.__name__, summary, self.tag, scope, public, description,
                params, query or [], body, responses))
            self.add_url_rule(rule, endpoint=fn.__name__, view_func=fn, methods=[method])
            return fn

        return deco


# -- request helpers ------------------------------------------------------------------------
def json_body(*, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
    """The request's JSON object, with only the named fields (unknown ones refused)."""
    if not request.is_json:
        raise UnsupportedMediaType("send a JSON object with 'Content-Type: application/json'")
    try:
        doc = json.loads(request.get_data(cache=True) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("the body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the body must be a JSON object")
    unknown = sorted(set(doc) - set(required) - set(optional))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)} (fields: "
                           f"{', '.join((*required, *optional))})", fields=unknown)
    missing = [k for k in required if k not in doc]
    if missing:
        raise InvalidInput(f"missing field(s): {', '.join(missing)}", fields=missing)
    return doc


def string_field(doc: dict, key: str, *, max_len: int = 200, required: bool = True,
                 allow_empty: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (not allow_empty and not value.strip()) \
            or len(value) > max_len:
        raise InvalidInput(f"'{key}' must be a string of 1 to {max_len} characters")
    return value


def int_arg(name: str, default: int, *, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter '{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise InvalidInput(f"query parameter '{name}' must be between {lo} and {hi}")
    return value


def choice_arg(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if raw not in choices:
        raise InvalidInput(f"query parameter '{name}' must be one of {', '.join(choices)}")
    return raw


# -- OpenAPI building blocks used by the area modules ----------------------------------------------
def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def json_request(schema: dict, description: str = "") -> dict:
    return {"required": True, "description": description,
            "content": {"application/json": {"schema": schema}}}


def query_param(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def items_of(name: str) -> dict:
    return {"type": "object", "required": ["items"],
            "properties": {"items": {"type": "array", "items": ref(name)}}}


# Names and handles exactly as vault/handles.py rules them (a test checks the two agree):
# 1-32 of a-z, 0-9 and '-', starting with a letter, no '--', no trailing '-', not a
# reserved word. A '-' must be followed by a letter or digit, which the lookahead says
# while every repetition stays one character (so the count bounds the length). END is '$'
# that also holds in Python, where '$' matches before a final newline.
END = r"$(?!\n)"
_NAME_RE = rf"[a-z](?:[a-z0-9]|-(?=[a-z0-9])){{0,{MAX_NAME - 1}}}"
_RESERVED_RE = "|".join(sorted(RESERVED))
NAME_SCHEMA = {"type": "string", "pattern": f"^{_NAME_RE}{END}", "maxLength": MAX_NAME,
               "not": {"enum": sorted(RESERVED)}}
HANDLE_SCHEMA = {"type": "string", "maxLength": 2 * MAX_NAME + 2,
                 "pattern": rf"^@?(?!(?:{_RESERVED_RE})/){_NAME_RE}"
                            rf"/(?!(?:{_RESERVED_RE}){END}){_NAME_RE}{END}",
                 "description": "a handle, OWNER/NAME (a leading '@' is allowed)"}
HANDLE_PARAMS = {"owner": {**NAME_SCHEMA, "example": "smiths"},
                 "name": {**NAME_SCHEMA, "example": "ana"}}


def state():
    """The app's shared state (``web.app.AppState``)."""
    from flask import current_app

    return current_app.extensions["idvault"]
