"""The node pack follows ComfyUI's node conventions, and loads the way ComfyUI loads a
folder of ``custom_nodes`` (its ``__init__.py`` by file location, under the folder's name)
without importing any of idvault's own packages."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from web.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

PACK = Path(__file__).resolve().parents[3] / "web" / "comfyui"


def test_every_node_follows_the_conventions():
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert {"idvault Identity", "idvault Scene", "idvault Apply FaceID",
            "idvault Apply InstantID"} <= set(NODE_DISPLAY_NAME_MAPPINGS.values())
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional"} and spec["required"], name
        inputs = {**spec["required"], **spec.get("optional", {})}
        for key, value in inputs.items():
            assert isinstance(value, tuple) and value, (name, key)
            assert isinstance(value[0], str | list), (name, key)  # a type name or a combo
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, name
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        assert cls.CATEGORY == "idvault"
        # ComfyUI calls FUNCTION (and IS_CHANGED) with the inputs as keyword arguments.
        for method in [getattr(cls(), cls.FUNCTION)] + (
                [cls.IS_CHANGED] if hasattr(cls, "IS_CHANGED") else []):
            params = inspect.signature(method).parameters
            assert set(inputs) <= set(params), (name, method.__name__)
            required = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
            assert required <= set(spec["required"]), (name, method.__name__)


LOADER = """
import importlib.util, json, sys
path, name = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS),
                  "names": module.NODE_DISPLAY_NAME_MAPPINGS,
                  "idvault": sorted({m.split(".")[0] for m in sys.modules}
                                    & {"vault", "encoders", "generators", "web"})}))
"""


def test_loads_like_a_comfyui_custom_node_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", LOADER, str(PACK), "idvault_nodes"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["nodes"] == sorted(NODE_CLASS_MAPPINGS)
    assert doc["names"] == NODE_DISPLAY_NAME_MAPPINGS
    assert doc["idvault"] == []  # the apply nodes import idvault's model code only when run


def test_docs_workflow_uses_the_nodes_as_declared():
    """docs/comfyui.md's API-format workflow: every idvault node exists, gets every
    required input and no unknown one; links point at existing nodes' outputs."""
    import re

    text = (PACK.parents[1] / "docs" / "comfyui.md").read_text()
    (block,) = re.findall(r"```json\n(.*?)```", text, re.S)
    prompt = json.loads(block)
    ours = [n for n in prompt.values() if n["class_type"].startswith("Idvault")]
    assert {n["class_type"] for n in ours} == {"IdvaultIdentity", "IdvaultLoadFaceID",
                                               "IdvaultApplyFaceID"}
    for node in ours:
        spec = NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        allowed = {**spec["required"], **spec.get("optional", {})}
        assert set(spec["required"]) <= set(node["inputs"]) <= set(allowed), node
    for node in prompt.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt, value
                source = prompt[value[0]]["class_type"]
                if source in NODE_CLASS_MAPPINGS:
                    assert value[1] < len(NODE_CLASS_MAPPINGS[source].RETURN_TYPES)
    # And the documented display names are the registered ones.
    for title in NODE_DISPLAY_NAME_MAPPINGS.values():
        assert f"**{title}**" in text, title
