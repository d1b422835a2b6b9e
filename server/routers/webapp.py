"""``/app/``: the browser training page, its Web Worker, the device runtime and TF.js, all same-origin.

The runtime's ES modules import ``@tensorflow/tfjs`` by its package name; a module worker has no import
map, so they are served with that one specifier pointing at the installed ``tf.fesm.min.js``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from .._browser import TFJS_BUNDLE
from .._errors import APIError

router = APIRouter(prefix="/app", tags=["app"], include_in_schema=False)
_NAME = re.compile(r"[A-Za-z0-9_\-]+\.(js|html|css)")
_TYPES = {"js": "text/javascript", "html": "text/html", "css": "text/css"}
_TFJS_IMPORT = re.compile(r"""from\s+'@tensorflow/tfjs'""")


def _file(root: Path, name: str) -> Path:
    path = root / name
    if not _NAME.fullmatch(name) or not path.is_file():
        raise APIError(404, "not_found", f"no file {name!r} in the app")
    return path


@router.get("")
def root() -> RedirectResponse:
    return RedirectResponse("/app/")


@router.get("/")
def index(request: Request) -> FileResponse:
    return FileResponse(request.app.state.js_package / "app" / "index.html", media_type="text/html")


@router.get("/vendor/tfjs.js")
def tfjs(request: Request) -> FileResponse:
    return FileResponse(request.app.state.js_package / TFJS_BUNDLE, media_type="text/javascript",
                        headers={"Cache-Control": "max-age=3600"})


@router.get("/runtime/{name}")
def runtime(name: str, request: Request) -> Response:
    """A module of the device runtime (``src/``), importing TF.js from ``/app/vendor/tfjs.js``."""
    text = _file(request.app.state.js_package / "src", name).read_text()
    return Response(_TFJS_IMPORT.sub("from '../vendor/tfjs.js'", text), media_type="text/javascript")


@router.get("/{name}")
def asset(name: str, request: Request) -> FileResponse:
    path = _file(request.app.state.js_package / "app", name)
    return FileResponse(path, media_type=_TYPES[path.suffix[1:]])
