"""One contract: splitexport.protocol is what the server answers, what both clients use, and what the docs list."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from splitexport import OptimizerSpec, protocol
from splitexport.protocol import ErrorCode
from tests._support import make_bundle

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "device_runtime" / "js" / "src"


def test_js_constants_are_generated_from_the_protocol_module() -> None:
    """device_runtime/js/src/protocol.js is `python -m splitexport.protocol --js`; regenerate it if this fails."""
    assert (JS / "protocol.js").read_text() == protocol.js_module()


def test_js_client_uses_the_generated_constants_not_literals() -> None:
    source = (JS / "client.js").read_text()
    assert "from './protocol.js'" in source
    literals = set(re.findall(r"'([^'\n]*)'", source)) | set(re.findall(r'"([^"\n]*)"', source))
    assert not literals & {c.value for c in ErrorCode}, "error codes in client.js must be ErrorCode.X"
    assert protocol.MEDIA_TYPE not in literals
    bodies = re.findall(r"encodeSafetensors\(\{([^}]*)\}", source)
    assert len(bodies) == 4
    for body in bodies:  # every wire tensor name is Tensor.X
        assert all(key.strip().startswith("[Tensor.") for key in re.findall(r"([^,]+):", body)), body


def _raised_codes() -> list[tuple[str, int, str]]:
    """(where, status, code) of every ``APIError(status, "code", ...)`` and ``APIError.of(ErrorCode.X, ...)``."""
    found = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(func, ast.Name) and func.id == "APIError" and len(node.args) >= 2:
                status, code = node.args[0], node.args[1]
                if isinstance(status, ast.Constant) and isinstance(code, ast.Constant):
                    found.append((where, int(str(status.value)), str(code.value)))
            if isinstance(func, ast.Attribute) and func.attr == "of" and node.args:
                member = node.args[0]
                if isinstance(member, ast.Attribute) and isinstance(member.value, ast.Name) \
                        and member.value.id == "ErrorCode":
                    found.append((where, ErrorCode[member.attr].status, ErrorCode[member.attr].value))
    return found


def test_every_code_the_server_raises_is_an_error_code_with_its_status() -> None:
    raised = _raised_codes()
    assert len(raised) > 30
    for where, status, code in raised:
        assert code in ErrorCode.__members__.values(), f"{where}: {code!r} is not in splitexport.protocol.ErrorCode"
        assert ErrorCode(code).status == status, f"{where}: {code} is {status}; ErrorCode says {ErrorCode(code).status}"


def test_the_protocol_paths_are_the_servers_routes(mlp_bundle_path: Path, tmp_path: Path) -> None:
    from server import ServerSettings, create_app

    app = create_app(ServerSettings(bundle=mlp_bundle_path, state_dir=tmp_path / "state"))
    served = set(app.openapi()["paths"])
    declared = {p.replace("{call}", c) if "{call}" in p else p for p in protocol.PATHS
                for c in ("forward", "backward", "train")}
    assert served == declared


def test_openapi_documents_safetensors_bodies_bearer_auth_and_every_error(mlp_bundle_path: Path,
                                                                          tmp_path: Path) -> None:
    from server import ServerSettings, create_app

    doc = create_app(ServerSettings(bundle=mlp_bundle_path, state_dir=tmp_path / "state")).openapi()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == {c.value for c in ErrorCode}
    forward = doc["paths"][protocol.STEP.replace("{call}", "forward")]["post"]
    assert forward["security"] == [{"bearer": []}]
    binary = {"schema": {"type": "string", "format": "binary"}}
    assert forward["requestBody"]["content"] == {protocol.MEDIA_TYPE: binary}
    assert forward["responses"]["200"]["content"] == {protocol.MEDIA_TYPE: binary}
    statuses = {c.status for c in ErrorCode if c is not ErrorCode.UNREACHABLE}
    assert {int(s) for s in forward["responses"] if s != "200"} == statuses
    for code in ErrorCode:
        if code is not ErrorCode.UNREACHABLE:
            assert code.value in forward["responses"][str(code.status)]["description"]
    session = doc["paths"][protocol.SESSION]["get"]
    assert "413" not in session["responses"] and "403" in session["responses"]
    assert "security" not in doc["paths"][protocol.HEALTHZ]["get"]


JSON_MODELS = {(protocol.SESSIONS, "post", "201"): "SessionOpened", (protocol.SESSION, "get", "200"): "SessionState",
               (protocol.HEALTHZ, "get", "200"): "Health", (protocol.MANIFEST, "get", "200"): "ManifestReply",
               (protocol.STRATEGY, "get", "200"): "StrategyInfo", (protocol.ITERATION, "get", "200"): "IterationStatus"}
"""Every JSON route of the protocol (the dashboard's aside) and its response model in the OpenAPI document."""


def test_openapi_names_a_response_model_for_every_json_route(mlp_bundle_path: Path, tmp_path: Path) -> None:
    from server import ServerSettings, create_app

    doc = create_app(ServerSettings(bundle=mlp_bundle_path, state_dir=tmp_path / "state")).openapi()
    schemas = doc["components"]["schemas"]
    for (path, method, status), name in JSON_MODELS.items():
        content = doc["paths"][path][method]["responses"][status]["content"]
        assert content == {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}, path
        assert schemas[name]["type"] == "object" and schemas[name]["properties"], name
    assert set(schemas["SessionOpened"]["required"]) == {"session_id", "next_step", "expected", "split", "segment"}
    assert schemas["SessionState"]["properties"]["expected"]["enum"] == ["forward", "backward"]
    assert "expected" not in schemas["IterationStatus"]["required"]  # only while the iteration is open


def test_json_routes_answer_the_same_bytes_as_before_the_models(mlp_bundle_path: Path, tmp_path: Path) -> None:
    """The response models change the document, not the wire: each JSON route answers exactly the bytes of the
    dict its handler builds, serialized as before the models (the handlers' ``dict[str, object]`` return type,
    which FastAPI encodes with pydantic: compact, ``1e-8`` for floats); the JS client and the docs rely on it."""
    import httpx
    from pydantic import TypeAdapter

    from server.routers.artifacts import _device_files
    from tests._support import TOKEN, threaded_server

    def wire(d: dict[str, object]) -> bytes:
        return TypeAdapter(dict[str, object]).dump_json(d)

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with threaded_server(mlp_bundle_path, tmp_path / "state", strategy="psl", num_clients=1) as (url, state):
        opened = httpx.post(f"{url}/v1/sessions", headers=auth)
        sid = opened.json()["session_id"]
        session = state.sessions[sid]
        assert opened.status_code == 201
        assert opened.content == wire({**session.public(), "split": state.split, "segment": state.spec.name})
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).content == wire(session.public())
        assert httpx.get(f"{url}/healthz").content == wire({"status": "ok", "split": state.split,
                                                            "segment": state.spec.name, "steps_applied": 0})
        manifest = httpx.get(f"{url}/v1/manifest", headers=auth).content
        assert manifest == wire({"manifest": state.bundle.manifest.model_dump(mode="json"),
                                 "device_files": _device_files(state)})
        assert state.rounds is not None
        assert httpx.get(f"{url}/v1/strategy", headers=auth).content == wire(state.rounds.info())
        status = httpx.get(f"{url}/v1/sessions/{sid}/steps/0", headers=auth)
        # the iteration is open now (the call opened it): what RoundHost.status answers for an open one
        assert status.content == wire({"step": 0, "participate": True, "open": True, "participants": 1, "round": 0,
                                       "expected": "forward"})
        assert b'"expected"' in status.content


def test_docs_list_every_error_code_with_its_status_and_test() -> None:
    """docs/protocol.md's bad-input matrix: one row per code, ``| status | `code` | ... | test |``."""
    docs = (ROOT / "docs" / "protocol.md").read_text()
    rows = {m.group(2): (int(m.group(1)), m.group(3)) for m in
            re.finditer(r"^\| (\d{3}) \| `([a-z_]+)` \|.*\| ([^|]*) \|$", docs, flags=re.MULTILINE)}
    assert set(rows) == {c.value for c in ErrorCode}, set(rows) ^ {c.value for c in ErrorCode}
    for code, (status, tests) in rows.items():
        assert ErrorCode(code).status == status, code
        for ref in re.findall(r"`(tests/[\w/]+\.py)::(\w+)", tests):
            file, name = ref
            assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.MULTILINE), f"{code}: no {file}::{name}"


def test_codec_round_trip() -> None:
    arrays: dict[str, np.ndarray] = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    back = protocol.decode(protocol.encode(arrays, np.float16))
    assert back["a"].dtype == np.float16 and back["b"].dtype == np.int64
    np.testing.assert_array_equal(back["a"].astype(np.float32), arrays["a"])
    assert ErrorCode.BUSY.retryable and not ErrorCode.WRONG_STEP.retryable


@pytest.fixture
def mlp_bundle_path(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "mlp", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1))
