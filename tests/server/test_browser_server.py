"""What browsers need from the server: CORS (``--cors-origin``), device metrics, ``--app`` and ``/dashboard``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from server import ServerSettings
from tests._support import TOKEN, threaded_server

ORIGIN = "http://127.0.0.1:9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def preflight(url: str, origin: str = ORIGIN) -> httpx.Response:
    return httpx.options(f"{url}/v1/sessions/x/steps/0/forward", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_no_cors_by_default(mlp_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_bundle, tmp_path / "s") as (url, _):
        assert preflight(url).status_code == 405
        r = httpx.post(f"{url}/v1/sessions", headers={**AUTH, "Origin": ORIGIN})
        assert r.status_code == 201 and "access-control-allow-origin" not in r.headers


def test_cors_origin_allows_the_api_and_exposes_timing(mlp_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_bundle, tmp_path / "s", cors_origins=[ORIGIN], cors_max_age_s=321) as (url, _):
        r = preflight(url)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")} >= {
            "authorization", "content-type"}
        assert r.headers["access-control-max-age"] == "321"
        assert preflight(url, "http://evil.example").status_code == 400
        r = httpx.post(f"{url}/v1/sessions", headers={**AUTH, "Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert exposed == {"server-timing", "retry-after"}
        # refusals carry the CORS headers too, so a page can read the error code
        r = httpx.post(f"{url}/v1/sessions", headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("origin", ["*", "http://a.example/", "a.example", "http://a.example/path", "ftp://a"])
def test_bad_cors_origin_is_refused(mlp_bundle: Path, origin: str) -> None:
    with pytest.raises(ValidationError, match="not scheme://host"):
        ServerSettings(bundle=mlp_bundle, cors_origins=[origin])


def test_cli_bad_cors_origin_one_line(mlp_bundle: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "splitexport", "serve", str(mlp_bundle), "--cors-origin", "*"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "not scheme://host" in r.stderr and "Traceback" not in r.stderr


def test_device_metrics_feed_the_dashboard(mlp_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_bundle, tmp_path / "s", app=True) as (url, _):
        sid = httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]
        metrics = f"{url}/v1/sessions/{sid}/metrics"
        r = httpx.post(metrics, headers=AUTH, json={"epoch": 1, "loss": 0.5, "accuracy": 0.75})
        assert r.status_code == 204, r.text
        for bad in ({"loss": "NaN"}, {"loss": "x"}, [1]):
            r = httpx.post(metrics, headers=AUTH, json=bad)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (bad, r.text)
        assert httpx.post(f"{url}/v1/sessions/nope/metrics", headers=AUTH, json={}).status_code == 404
        assert httpx.get(f"{url}/v1/dashboard").status_code == 401
        d = httpx.get(f"{url}/v1/dashboard", headers=AUTH).json()
        rows = d["device_metrics"][sid]
        assert [(r["epoch"], r["loss"], r["accuracy"]) for r in rows] == [(1, 0.5, 0.75)]  # the refused ones left none
        assert [s["session_id"] for s in d["sessions"]] == [sid] and d["steps_applied"] == 0
        assert d["strategy"] is None and d["split"] == "double"


def test_app_serves_page_runtime_and_tfjs(mlp_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_bundle, tmp_path / "s", app=True) as (url, _):
        assert "<title>" in httpx.get(f"{url}/app/").text
        assert "<title>" in httpx.get(f"{url}/dashboard").text
        client = httpx.get(f"{url}/app/runtime/client.js")
        assert client.headers["content-type"].startswith("text/javascript")
        assert "from '../vendor/tfjs.js'" in client.text and "@tensorflow/tfjs'" not in client.text
        assert httpx.get(f"{url}/app/vendor/tfjs.js").status_code == 200
        for bad in ("runtime/..%2Fpackage.json", "runtime/nope.js", "..%2F..%2Fpyproject.toml", "worker.py"):
            assert httpx.get(f"{url}/app/{bad}").status_code == 404, bad
    with threaded_server(mlp_bundle, tmp_path / "s2") as (url, _):
        assert httpx.get(f"{url}/app/").status_code == 404  # only with --app
        assert httpx.get(f"{url}/dashboard").status_code == 404


def test_app_without_the_js_package_is_one_clear_line(tmp_path: Path) -> None:
    from server._browser import check_js_package

    with pytest.raises(ValueError, match=r"--app: .*app/index.html is missing; serve --app needs a checkout"):
        check_js_package(tmp_path)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "index.html").write_text("<title>x</title>")
    with pytest.raises(ValueError, match=r"tf.fesm.min.js is missing; run `npm ci`"):
        check_js_package(tmp_path)
