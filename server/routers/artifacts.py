"""The bundle's manifest and device artifacts, fetched by content hash."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .._deps import Caller, State
from .._errors import APIError
from .._models import ManifestReply

router = APIRouter(prefix="/v1", tags=["artifacts"])


def _device_files(state: State) -> dict[str, str]:
    m = state.bundle.manifest
    rels = [p for s in m.device_segments for p in (s.torch_file, *(v for a in s.artifacts.values() for v in a.values()))]
    return {rel: m.files[rel] for rel in rels}


@router.get("/manifest", response_model=ManifestReply)
def manifest(state: State, _: Caller) -> dict[str, object]:
    """The bundle manifest, and which of its files a device needs."""
    return {"manifest": state.bundle.manifest.model_dump(mode="json"), "device_files": _device_files(state)}


@router.get("/artifacts/{sha256}")
def artifact(sha256: str, state: State, _: Caller) -> FileResponse:
    """A device file by its sha256; server-only files are never served."""
    for rel, digest in _device_files(state).items():
        if digest == sha256:
            return FileResponse(state.bundle.file(rel), media_type="application/octet-stream",
                                headers={"X-Content-SHA256": digest})
    raise APIError(404, "unknown_artifact", f"no device artifact with sha256 {sha256}")
