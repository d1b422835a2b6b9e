"""Split bundles: write a partition to a directory atomically, load it back verified.

Layout::

    bundle/
      manifest.json          # Manifest: cuts, segments, loss, optimizer, sha256 of every file
      torch/A.pt ...         # each segment as TorchScript (or a torch.export program)
      <format>/<segment>/... # device artifacts added by exporters (onnx, tfjs, tflite)

Loading checks every file against its sha256 and refuses a tampered bundle.
Writing goes to a temporary sibling directory renamed into place, so a failed
partition leaves no half bundle; artifact updates commit by replacing the
manifest last.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError
from torch import nn

from ._errors import BundleError, BundleIntegrityError
from ._loading import sha256_file
from ._manifest import (
    BATCH,
    DefenceSpec,
    LossSpec,
    Manifest,
    OptimizerSpec,
    SegmentSpec,
    SourceSpec,
    TensorSpec,
    TorchFormat,
)
from ._partition import Partition, Segment
from ._version import __version__

if TYPE_CHECKING:
    from ._manifest import PreprocessSpec

MANIFEST = "manifest.json"


class Bundle:
    """A verified bundle on disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, cuts={self.manifest.cuts})"

    def file(self, rel: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        if rel not in self.manifest.files:
            raise BundleError(f"{rel!r} is not a file of this bundle")
        return self.path / rel

    def segment(self, name: str) -> SegmentSpec:
        return self.manifest.segment(name)

    def torch_segment(self, name: str) -> nn.Module:
        """Segment ``name`` as a trainable torch module, loaded without user code."""
        spec = self.segment(name)
        return load_torch_segment(self.file(spec.torch_file), spec.torch_format)

    def add_artifacts(
        self, fmt: str, files: Mapping[str, Mapping[str, Path]], options: Mapping[str, object] | None = None
    ) -> None:
        """Copy exported files into ``<fmt>/<segment>/``, record them, and commit the manifest.

        ``files`` maps segment name -> artifact kind -> source path. Replaces any
        earlier export of the same format.
        """
        for seg_name in files:
            self.segment(seg_name)
        dir_name = fmt if not (self.path / fmt).exists() else f"{fmt}-{uuid.uuid4().hex[:8]}"
        staging = self.path / f".{dir_name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        new_files = dict(self.manifest.files)
        old = self.manifest.segments
        old_paths = {p for s in old for p in s.artifacts.get(fmt, {}).values()}
        for p in old_paths:
            new_files.pop(p, None)
        segments = []
        try:
            for seg in old:
                arts = dict(seg.artifacts)
                if seg.name in files:
                    entry: dict[str, str] = {}
                    for kind, src in files[seg.name].items():
                        src = Path(src)
                        rel = f"{dir_name}/{seg.name}/{src.name}"
                        dst = staging / seg.name / src.name
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if src.is_dir():
                            raise BundleError(f"artifact {src} is a directory; list its files")
                        shutil.copy2(src, dst)
                        entry[kind] = rel
                        new_files[rel] = sha256_file(dst)
                    arts[fmt] = entry
                else:
                    arts.pop(fmt, None)
                segments.append(seg.model_copy(update={"artifacts": arts}))
            exports = dict(self.manifest.exports)
            exports[fmt] = dict(options or {})
            manifest = self.manifest.model_copy(update={"segments": segments, "files": new_files, "exports": exports})
            manifest = Manifest.model_validate(manifest.model_dump())
            os.replace(staging, self.path / dir_name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _write_text_atomic(self.path / MANIFEST, manifest.to_json())
        self.manifest = manifest
        for p in old_paths:  # the previous export of this format, now unreferenced
            top = (self.path / p).relative_to(self.path).parts[0]
            if top != dir_name:
                shutil.rmtree(self.path / top, ignore_errors=True)


def load_torch_segment(path: Path, fmt: TorchFormat) -> nn.Module:
    """Load a segment saved by :func:`write_bundle` (no user code, no unpickling of objects)."""
    if fmt == "torchscript":  # run it under _torch_segment.eager_execution() for exact float rounding
        return torch.jit.load(str(path), map_location="cpu")
    return torch.export.load(str(path)).module()


def _save_torch_segment(seg: Segment, path: Path) -> TorchFormat:
    module = seg.module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.jit.save(torch.jit.script(module), str(path))
            return "torchscript"
        except Exception:  # noqa: BLE001 - any scripting failure falls back to torch.export
            example = torch.zeros(seg.input_shape, dtype=seg.input_dtype)
            state = {k: v.clone() for k, v in module.state_dict().items()}
            ep = torch.export.export(module, (example,))
            module.load_state_dict(state)  # an export's forward must not move BN statistics
            torch.export.save(ep, str(path))
            return "exported_program"


def _tensor_spec(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(name=name, shape=[BATCH, *shape[1:]], dtype=str(dtype).removeprefix("torch."))


def write_bundle(
    partition: Partition,
    out: str | Path,
    *,
    source: SourceSpec,
    loss: LossSpec | None = None,
    optimizer: OptimizerSpec | None = None,
    force: bool = False,
    preprocess: PreprocessSpec | Callable[[Manifest], PreprocessSpec] | None = None,
    defence: DefenceSpec | None = None,
) -> Bundle:
    """Write ``partition`` as a bundle directory at ``out`` (atomically).

    ``preprocess``: the data transform to record, or a function of the new manifest that computes it
    (``partition --data``: fitted on the data, checked against the bundle; an error leaves nothing written).
    ``defence``: NoPeek / activation noise on the first segment (``partition --nopeek/--activation-noise``).
    """
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "torch").mkdir()
        files: dict[str, str] = {}
        specs = []
        for i, seg in enumerate(partition.segments):
            rel = f"torch/{seg.name}.pt"
            fmt = _save_torch_segment(seg, tmp / rel)
            files[rel] = sha256_file(tmp / rel)
            in_name = "input" if i == 0 else f"{partition.segments[i - 1].name}_output"
            specs.append(
                SegmentSpec(
                    name=seg.name,
                    index=i,
                    role=seg.role,
                    is_last=seg.is_last,
                    modules=list(seg.modules),
                    input=_tensor_spec(in_name, seg.input_shape, seg.input_dtype),
                    output=_tensor_spec(f"{seg.name}_output", seg.output_shape, seg.dtype),
                    parameters=seg.num_parameters,
                    torch_file=rel,
                    torch_format=fmt,
                )
            )
        manifest = Manifest(
            splitexport_version=__version__,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            source=source,
            cuts=list(partition.cuts),
            split=partition.split,
            loss=loss or LossSpec(),
            optimizer=optimizer or OptimizerSpec(),
            defence=defence or DefenceSpec(),
            segments=specs,
            preprocess=None if callable(preprocess) else preprocess,
            files=files,
        )
        if callable(preprocess):
            manifest = manifest.model_copy(update={"preprocess": preprocess(manifest)})
        (tmp / MANIFEST).write_text(manifest.to_json())
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, manifest)


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle, validating its manifest and the sha256 of every file it lists."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing (create one with `splitexport partition`)")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, 1):
        raise BundleError(
            f"{mpath} has schema_version {raw.get('schema_version')!r}; this splitexport reads version 1"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{mpath} is not a valid manifest:\n{exc}") from exc
    root = path.resolve()
    for rel, digest in manifest.files.items():
        f = (path / rel).resolve()
        if root not in f.parents:
            raise BundleIntegrityError(f"manifest lists {rel!r}, which lies outside the bundle")
        if not f.is_file():
            raise BundleIntegrityError(f"bundle file {rel!r} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise BundleIntegrityError(
                f"bundle file {rel!r} was modified: sha256 {actual[:16]}... does not match the manifest's "
                f"{digest[:16]}...; re-create the bundle with `splitexport partition`"
            )
    for seg in manifest.segments:
        if manifest.scope == "device" and seg.role == "server":
            continue
        listed = [seg.torch_file, *(p for arts in seg.artifacts.values() for p in arts.values())]
        for rel in listed:
            if rel not in manifest.files:
                raise BundleIntegrityError(f"segment {seg.name} refers to {rel!r}, which has no sha256 in the manifest")
    return Bundle(path, manifest)


def deploy_bundle(bundle: Bundle, dest: str | Path, *, force: bool = False) -> Bundle:
    """Copy what a phone needs (device segments' files, a device-scope manifest) to ``dest``, atomically."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise BundleError(f"{dest} already exists; pass --force to replace it")
    m = bundle.manifest
    rels = [p for s in m.device_segments for p in (s.torch_file, *(v for a in s.artifacts.values() for v in a.values()))]
    manifest = m.model_copy(update={"scope": "device", "files": {r: m.files[r] for r in rels}})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for rel in rels:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.file(rel), tmp / rel)
        (tmp / MANIFEST).write_text(manifest.to_json())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(dest)


def _write_text_atomic(path: Path, text: str) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it over ``path`` if the block succeeds."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
