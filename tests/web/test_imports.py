"""A process that serves lookups, or runs a CLI command that needs no model, imports none of
the ML stack: torch, onnxruntime, faiss, OpenCV, diffusers, transformers, insightface.

Each check runs in a fresh interpreter and reads its ``sys.modules``: the test process
itself has imported everything by now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ML_STACK = ("torch", "onnxruntime", "faiss", "cv2", "diffusers", "transformers", "insightface")

SERVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    from tests.helpers import consent_doc
    from vault import api_keys
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault
    from web.app import WebConfig, create_app

    root = Path(sys.argv[1])
    vault = Vault.init(Settings(data_dir=root / "vault"), actor="test")
    vault.add_owner("smiths", "family", actor="test")
    vault.create_identity("smiths/ana", ConsentRequest.from_dict(consent_doc()), actor="test")
    with vault.session() as s:
        _, token = api_keys.create_key(s, "smiths", "t", list(api_keys.SCOPES), actor="test")
    app = create_app(WebConfig(vault=vault, secret_key="s" * 48, models_dir=root / "models"))
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    statuses = [client.get(path, headers=auth).status_code for path in (
        "/v1/health", "/v1/me", "/v1/identities/smiths/ana", "/v1/identities",
        "/v1/identities/smiths/ana/consent", "/v1/identities/smiths/ana/artifacts",
        "/v1/audit", "/v1/audit/verify", "/v1/openapi.json")]
    statuses.append(client.get("/login").status_code)
    app.extensions["idvault"].close()
    print(json.dumps({"statuses": statuses, "modules": sorted(sys.modules)}))
""")


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ml(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(ML_STACK))


def test_a_server_answering_lookups_imports_no_ml(tmp_path):
    result = _run(SERVER, str(tmp_path))
    assert result["statuses"] == [200] * len(result["statuses"])
    assert _ml(result["modules"]) == []
    assert "zxcvbn" not in result["modules"]  # 13 MiB; only setting a password needs it
    assert "flask" in result["modules"]  # the check itself reads the right process


def test_cli_commands_that_need_no_model_import_no_ml(tmp_path):
    code = textwrap.dedent("""
        import json, sys
        from click.testing import CliRunner
        from web.cli.main import cli

        data = ["--data-dir", sys.argv[1]]
        runner = CliRunner()
        codes = [runner.invoke(cli, args).exit_code for args in (
            ["init", *data], ["owner", "add", "smiths", "--kind", "family", *data],
            ["identity", "list", *data], ["audit", "verify", *data])]
        print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
    """)
    result = _run(code, str(tmp_path / "vault"))
    assert result["codes"] == [0, 0, 0, 0]
    assert _ml(result["modules"]) == []
