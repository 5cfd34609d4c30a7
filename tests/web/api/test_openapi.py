"""/v1/openapi.json is true: it validates, lists exactly the app's /v1 routes, and a
property-based fuzzer (schemathesis) driving the in-process app from it finds no server
error and no response that breaks the document."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from vault.api_keys import SCOPES
from web.api.openapi import openapi_path

IGNORED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture
def backend() -> str:
    return "sqlite"


def test_document_validates(web):
    from openapi_spec_validator import validate

    doc = web.client.get("/v1/openapi.json").get_json()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    # Every schema reference resolves.
    names = set(doc["components"]["schemas"])
    refs = set(re.findall(r"#/components/schemas/(\w+)", str(doc)))
    assert refs <= names, refs - names
    # Every link leads to an operation, naming exactly its path parameters.
    ops = {op["operationId"]: op for ops in doc["paths"].values() for op in ops.values()}
    links = [link for ops_ in doc["paths"].values() for op in ops_.values()
             for response in op["responses"].values()
             for link in response.get("links", {}).values()]
    assert len(links) >= 5
    for link in links:
        target = ops[link["operationId"]]
        assert set(link["parameters"]) == {p["name"] for p in target.get("parameters", [])
                                           if p["in"] == "path"}, link


def test_document_lists_exactly_the_v1_routes(web):
    doc = web.client.get("/v1/openapi.json").get_json()
    documented = {(path, method.upper()) for path, ops in doc["paths"].items()
                  for method in ops}
    routed = set()
    for rule in web.app.url_map.iter_rules():
        if rule.rule.startswith("/v1/") or rule.rule == "/v1":
            for method in rule.methods - IGNORED_METHODS:
                routed.add((openapi_path(rule.rule.removeprefix("/v1")), method))
    assert routed - documented == set(), f"routes missing from the document: {routed - documented}"
    assert documented - routed == set(), f"documented but not routed: {documented - routed}"


def test_docs_web_md_lists_exactly_the_operations(web):
    from pathlib import Path

    doc = web.client.get("/v1/openapi.json").get_json()
    text = (Path(__file__).resolve().parents[3] / "docs" / "web.md").read_text()
    rows = set(re.findall(r"^\| (GET|POST|PUT|DELETE|PATCH) \| `(/v1/[^`]*)` \| ([^|]+) \|",
                          text, re.MULTILINE))
    listed = {(m, p) for m, p, _ in rows}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == documented, listed ^ documented
    for method, path, scope in rows:
        declared = doc["paths"][path][method.lower()]["x-scope"]
        expected = declared if declared in ("public", "authenticated") else f"`{declared}`"
        # Jobs need their kind's scope: declared 'authenticated', documented so.
        assert scope.strip() in (expected, "the kind's" if declared == "authenticated" else ""), \
            (method, path, scope)


def test_every_operation_declares_its_scope_or_is_public(web):
    doc = web.client.get("/v1/openapi.json").get_json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["x-scope"] in (*SCOPES, "public", "authenticated"), f"{method} {path}"
            assert (op["x-scope"] == "public") == (op.get("security") == []), f"{method} {path}"
            assert "default" in op["responses"], f"{method} {path}: no error response"


def test_unauthenticated_calls_are_refused_everywhere(web):
    doc = web.client.get("/v1/openapi.json").get_json()
    for path, ops in doc["paths"].items():
        concrete = re.sub(r"\{(\w+)\}", lambda m: "1" if "id" in m.group(1) else "ana", path)
        for method, op in ops.items():
            resp = web.client.open(concrete, method=method.upper())
            if op.get("security") == []:
                assert resp.status_code == 200, (method, path)
                continue
            assert resp.status_code == 401, (method, path, resp.status_code)
            assert resp.get_json()["error"]["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.slow
def test_fuzz_the_api_from_its_document(web):
    """Schemathesis, positive and negative cases, every operation: no 5xx, responses
    conform to the document (status codes, content types, schemas), auth enforced."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # Some data for the examples to reach: smiths/ana exists.
    assert web.enroll("smiths/ana", 1, (0, 1)).status_code == 201
    headers = web.headers()
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", web.app)
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                # Schema-valid requests may still be refused on their meaning (a random
                # photo has no face: 422), so positive data acceptance is not checked.
                case.call_and_validate(headers=headers,
                                       excluded_checks=[positive_data_acceptance])

            try:
                run()
                ran += 1
            except Unsatisfiable:
                continue  # no negative case exists (no parameters)
            except Exception as exc:
                failures.append(f"{mode.value} {op.method.upper()} {op.path}: {exc}"[:2000])
    assert ran >= 40
    assert not failures, "\n\n".join(failures)


def test_name_and_handle_schemas_are_the_vaults_rules():
    """The document's NAME_SCHEMA and HANDLE_SCHEMA accept exactly what vault/handles.py
    accepts (reserved words included), over every short string of a telling alphabet."""
    import itertools

    import jsonschema

    from vault.errors import InvalidHandle
    from vault.handles import RESERVED, Handle, name_problems
    from web.api.blueprint import HANDLE_SCHEMA, NAME_SCHEMA

    def valid(schema, value):
        return jsonschema.Draft202012Validator(schema).is_valid(value)

    names = ["".join(p) for n in range(0, 5) for p in itertools.product("a0-Z", repeat=n)]
    names += sorted(RESERVED) + ["a" * 32, "a" * 33, "a-" * 16, "ana\n", "ana-", "a--b"]
    for name in names:
        assert valid(NAME_SCHEMA, name) == (not name_problems(name)), name
    for owner, name in itertools.product(["smiths", "all", "a-", "Ab"], names[:60] + ["all"]):
        for text in (f"{owner}/{name}", f"@{owner}/{name}"):
            try:
                Handle.parse(text)
                ok = True
            except InvalidHandle:
                ok = False
            assert valid(HANDLE_SCHEMA, text) == ok, text
    assert not valid(HANDLE_SCHEMA, "smiths/ana/x") and not valid(HANDLE_SCHEMA, "smiths")


def test_key_name_pattern_is_the_vaults_rule():
    """POST /api-keys 'name': the document's pattern accepts exactly what
    vault.api_keys.validate_key_name accepts (control characters, blanks, newlines)."""
    import itertools

    from vault.api_keys import validate_key_name
    from vault.errors import InvalidInput
    from web.api.keys import bp

    [op] = [o for o in bp.operations if o.method == "POST"]
    pattern = op.body["content"]["application/json"]["schema"]["properties"]["name"]["pattern"]
    for n in range(1, 4):
        for chars in itertools.product(["a", " ", "\x0f", "\x7f", "\n", "\u009c", "\t"], repeat=n):
            name = "".join(chars)
            try:
                validate_key_name(name)
                accepted = True
            except InvalidInput:
                accepted = False
            assert bool(re.search(pattern, name)) == accepted, repr(name)
