"""Schemathesis, as an operator would run it, over a running `idvault serve`: every phase
(examples, coverage, fuzzing, stateful) and its DEFAULT checks, against a vault with an
owner, an enrolled identity with artifacts and an API key holding every scope. It must
find no server error and no mismatch between /v1/openapi.json and what the server does.

tests/web/api/test_openapi.py drives the in-process app per operation; this one goes
through waitress, the CLI and real sockets, with the whole schemathesis run.

What is configured, and why (nothing here switches a check off):
- ``positive_data_acceptance`` also accepts 422 on the operations whose document declares
  a 422: the refusals a schema cannot say (a photo with no face, a consent date in the
  past, a 'method' for an identity the prompt does not mention).
- ``not_a_server_error`` also accepts 503 on the operations whose document declares a 503:
  a node without the models answers so, deliberately (``POST /generate`` on a server with
  no generation models, as here).
- The stateful phase builds its request chains from the document's links (and Location
  headers) only: its 'dependency-analysis' guess feeds an identity's UUID into ``{name}``,
  a request the document itself calls invalid.
- A hook keeps the run from revoking its own key or erasing the identity with artifacts
  (each is sent to a twin: another key id, the identity smiths/ben).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent_doc
from vault.api_keys import SCOPES
from web.cli.main import main

EXAMPLES = 10  # per operation and phase: about 40 s here, a few thousand requests

HOOKS = '''
import os

import schemathesis

KEY_ID = os.environ["IDV_FUZZ_KEY_ID"]


@schemathesis.hook
def before_call(context, case, kwargs):
    op, params = case.operation, case.path_parameters or {}
    if op.method.upper() == "DELETE" and op.path == "/v1/api-keys/{key_id}" \\
            and str(params.get("key_id")) == KEY_ID:
        params["key_id"] = 2_000_000_000
    if op.method.upper() in ("DELETE", "POST") and params.get("name") == "ana" and op.path in (
            "/v1/identities/{owner}/{name}", "/v1/identities/{owner}/{name}/consent/withdraw"):
        params["name"] = "ben"
'''

POSITIVE_DEFAULT = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
SERVER_ERROR_DEFAULT = ["2xx", "3xx", "4xx"]


def _photo(person: int, i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_face(person, i)).save(buf, "JPEG")
    return buf.getvalue()


def config_for(doc: dict) -> str:
    """schemathesis.toml: the allowances above, derived from the document itself."""
    lines = ['hooks = "idv_fuzz_hooks"', "", "[phases.stateful.inference]",
             'algorithms = ["location-headers"]', ""]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            declared = op["responses"]
            if "422" not in declared and "503" not in declared:
                continue
            lines += ["[[operations]]", f'include-path = "{path}"',
                      f'include-method = "{method.upper()}"']
            if "422" in declared:
                lines.append("checks.positive_data_acceptance.expected-statuses = "
                             + json.dumps([*POSITIVE_DEFAULT, "422"]))
            if "503" in declared:
                lines.append("checks.not_a_server_error.expected-statuses = "
                             + json.dumps([*SERVER_ERROR_DEFAULT, "503"]))
            lines.append("")
    return "\n".join(lines)


@pytest.fixture
def served(tmp_path, capsys):
    from encoders.standins.face_pack import write_tiny_face_pack

    data, models = tmp_path / "vault", tmp_path / "models"
    write_tiny_face_pack(models / "models" / "buffalo_l")
    env = {**os.environ, "IDVAULT_DEBUG": "", "IDVAULT_MODELS": str(models)}
    base = [sys.executable, "-m", "web.cli.main"]

    def cli(*args: str) -> str:
        rc = main([*args, "--data-dir", str(data)])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return out

    cli("init")
    cli("owner", "add", "smiths", "--kind", "family")
    scopes = [a for s in SCOPES for a in ("--scope", s)]
    created = json.loads(cli("apikey", "create", "smiths", "--name", "fuzz", *scopes, "--json"))
    (tmp_path / "consent.json").write_text(json.dumps(consent_doc()))
    cli("identity", "add", "smiths/ben", "--consent", str(tmp_path / "consent.json"))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*base, "serve", "--data-dir", str(data), "--port", "0",
                                 "--workers", "1", "--threads", "4", "--models", str(models)],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=os.getcwd(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url, token = m.group(1), created["token"]
        resp = requests.post(f"{url}/v1/identities/smiths/ana/enroll",
                             headers={"Authorization": f"Bearer {token}"},
                             files=[("photos", ("a.jpg", _photo(1, 0))),
                                    ("photos", ("b.jpg", _photo(1, 1)))],
                             data={"consent": json.dumps(consent_doc())}, timeout=120)
        assert resp.status_code == 201, resp.text
        assert resp.json()["artifacts"]
        yield url, token, created["key"]["id"], log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


@pytest.mark.slow
def test_schemathesis_default_checks_over_the_running_server(served, tmp_path):
    url, token, key_id, log = served
    doc = requests.get(f"{url}/v1/openapi.json", timeout=30).json()
    (tmp_path / "idv_fuzz_hooks.py").write_text(HOOKS)
    (tmp_path / "schemathesis.toml").write_text(config_for(doc))
    report = tmp_path / "report.json"
    env = {**os.environ, "IDV_FUZZ_KEY_ID": str(key_id),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    st = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(st), "--config-file", str(tmp_path / "schemathesis.toml"), "run",
         f"{url}/v1/openapi.json", "-H", f"Authorization: Bearer {token}",
         "--seed", "1", "-n", str(EXAMPLES), "--generation-deterministic",
         "-w", "1", "--no-color",
         "--report", "json", "--report-json-path", str(report)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    (tmp_path / "schemathesis.out").write_text(run.stdout)
    result = json.loads(report.read_text())
    ops = result["operations"]
    # Every operation but the document itself, which schemathesis leaves out.
    assert ops["tested"] == ops["total"] == len([m for p in doc["paths"].values() for m in p]) - 1
    assert result["test_cases"]["generated"] > 20 * ops["total"], result["test_cases"]
    # Every phase ran, the stateful one too (along the document's links), so the checks
    # that only it applies (use_after_free, ensure_resource_availability) had their say.
    assert {name: phase["status"] for name, phase in result["phases"].items()} == {
        "examples": "success", "coverage": "success", "fuzzing": "success",
        "stateful": "success"}, result["phases"]
    assert result["errors"] == [], run.stdout[-5000:]
    assert result["failures"] == [], run.stdout[-8000:]
    assert run.returncode == 0, run.stdout[-5000:]
    # The key survived: the run exercised every operation authenticated to the end.
    assert requests.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {token}"},
                        timeout=30).status_code == 200
    assert "Traceback" not in log.read_text()
