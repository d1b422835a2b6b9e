"""Loading ``model.pt`` safely, with the kind of file detected automatically.

Kinds: a state dict (needs ``arch="package.module:factory"``, loaded with
``weights_only=True``), a TorchScript archive, a ``torch.export`` program
(``.pt2``), or a whole pickled ``nn.Module`` (only with ``trust_pickle=True``:
unpickling runs code from the file).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import operator
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._errors import ModelLoadError, UnsafePickleError, UntraceableModelError

ModelKind = Literal["state_dict", "torchscript", "exported_program", "pickle"]


@dataclass
class LoadedModel:
    """A model ready to trace, with where it came from."""

    module: nn.Module
    kind: ModelKind
    sha256: str
    path: Path
    arch: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_kind(path: Path) -> Literal["torchscript", "exported_program", "torch_save"]:
    """Tell a TorchScript archive, a torch.export program and a ``torch.save`` file apart."""
    if not zipfile.is_zipfile(path):
        return "torch_save"  # legacy (non-zip) torch.save format
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.endswith(("/archive_format", "models/model.json")) for n in names):
        return "exported_program"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return "torch_save"


def resolve_factory(arch: str) -> Callable[[], nn.Module]:
    """Import ``package.module:factory`` (a class or a function returning an ``nn.Module``)."""
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"--arch must look like 'package.module:factory', got {arch!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for --arch {arch!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{module_name!r} has no callable {attr!r} (from --arch {arch!r})")
    return factory  # type: ignore[no-any-return]


def _as_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a model file of any supported kind into an ``nn.Module`` that can be traced."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    digest = sha256_file(path)
    kind = detect_kind(path)
    if kind == "torchscript":
        try:
            ts = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path} looks like a TorchScript archive but failed to load: {exc}") from exc
        return LoadedModel(torchscript_to_fx(ts), "torchscript", digest, path)
    if kind == "exported_program":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path} looks like a torch.export program but failed to load: {exc}") from exc
        return LoadedModel(ep.module(), "exported_program", digest, path)

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UnsafePickleError(
                f"{path} holds pickled Python objects, not just tensors, and unpickling runs code from the "
                "file, so it is refused by default. Save the weights instead "
                "(torch.save(model.state_dict(), ...)) and pass --arch package.module:factory, or save a "
                "TorchScript archive (torch.jit.script) or a torch.export program (.pt2). If you trust "
                f"this file, pass --trust-pickle. (weights-only loader said: {str(exc).splitlines()[0]})"
            ) from exc
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise ModelLoadError(f"{path} unpickled to a {type(obj).__name__}, not an nn.Module") from exc
        return LoadedModel(obj, "pickle", digest, path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as a PyTorch file: {exc}") from exc

    state = _as_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if arch is None:
        raise ModelLoadError(
            f"{path} is a state dict (weights only); pass --arch package.module:factory naming the code "
            "that builds the model, e.g. --arch splitexport.models:resnet_cnn"
        )
    model = resolve_factory(arch)()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {arch!r} returned a {type(model).__name__}, not an nn.Module")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"the state dict does not fit --arch {arch!r}: missing keys {list(result.missing_keys)[:5]}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )
    return LoadedModel(model, "state_dict", digest, path, arch)


_LOAD_WAY_OUT = "save the model as a state dict with --arch, or as a torch.export program (.pt2)"


def torchscript_to_fx(ts: torch.jit.ScriptModule, *, way_out: str = _LOAD_WAY_OUT) -> fx.GraphModule:
    """Rebuild a TorchScript module's top-level ``forward`` as an fx graph.

    Submodules called from ``forward`` stay whole (TorchScript, with their own
    train/eval behaviour; ``call_module`` nodes keep their qualified names), so cuts
    are possible after any of them; cuts inside a submodule are not. As fx traces the
    same code: ``aten::`` nodes become ``torch.ops.aten.<op>.<overload>`` calls named after
    the op, ``x.device`` / ``x.dtype`` ``getattr`` calls, items ``operator.getitem`` calls,
    and calls of torch's scripted Python functions (``F.relu6``) calls of those functions.
    Anything else is an :class:`UntraceableModelError` (one line, ending in ``way_out``).
    """
    graph = fx.Graph()
    env: dict[str, Any] = {}
    ts_graph = ts.graph
    inputs = list(ts_graph.inputs())
    env[inputs[0].debugName()] = ("module", "")
    for value in inputs[1:]:
        env[value.debugName()] = graph.placeholder(value.debugName().split(".")[0] or "x")

    def arg(value: Any) -> Any:
        return env[value.debugName()]

    for node in ts_graph.nodes():
        kind = node.kind()
        outs = list(node.outputs())
        if kind == "prim::Constant":
            env[outs[0].debugName()] = outs[0].toIValue()
        elif kind == "prim::GetAttr":
            owner = arg(next(node.inputs()))
            if not (isinstance(owner, tuple) and owner[0] == "module"):
                raise UntraceableModelError(
                    f"the TorchScript forward reads attribute {node.s('name')!r} of a value that is not a module; "
                    + way_out
                )
            path = f"{owner[1]}.{node.s('name')}" if owner[1] else node.s("name")
            target = ts
            for atom in path.split("."):
                target = getattr(target, atom)
            env[outs[0].debugName()] = ("module", path) if isinstance(target, nn.Module) else graph.get_attr(path)
        elif kind == "prim::CallMethod" and node.s("name").startswith("forward"):  # forward__0: an overload (RNNs)
            ins = list(node.inputs())
            owner = arg(ins[0])
            env[outs[0].debugName()] = graph.call_module(owner[1], tuple(arg(v) for v in ins[1:]))
        elif kind == "prim::CallFunction":  # a scripted Python function: torch's (F.relu6, F.softmax) is called as such
            ins = list(node.inputs())
            fn, params = _torch_function(str(ins[0].type()), way_out)
            values = [arg(v) for v in ins[1:]]
            env[outs[0].debugName()] = graph.call_function(
                fn, tuple(values[:1]), dict(zip(params[1:], values[1:])), name=fn.__name__
            )
        elif kind == "prim::ListConstruct":
            env[outs[0].debugName()] = [arg(v) for v in node.inputs()]
        elif kind in ("prim::TupleIndex", "aten::__getitem__"):  # a tuple's, list's (x.shape[1]) or dict's item
            ins = list(node.inputs())
            env[outs[0].debugName()] = graph.call_function(operator.getitem, (arg(ins[0]), arg(ins[1])))
        elif kind == "prim::TupleUnpack":
            source = arg(next(node.inputs()))
            for i, out in enumerate(outs):
                env[out.debugName()] = graph.call_function(operator.getitem, (source, i))
        elif kind in ("prim::device", "prim::dtype"):  # x.device / x.dtype, as fx traces them
            attr = kind.removeprefix("prim::")
            env[outs[0].debugName()] = graph.call_function(getattr, (arg(next(node.inputs())), attr), name=attr)
        elif kind.startswith("aten::"):
            op, args, kwargs = _aten_call(node, [arg(v) for v in node.inputs()])
            # named after the op (``add``, ``add_1``), not its overload: as fx names the same Python code
            env[outs[0].debugName()] = graph.call_function(op, args, kwargs, name=kind.removeprefix("aten::"))
        else:
            raise UntraceableModelError(
                f"the TorchScript forward uses {kind}, which splitexport cannot rebuild as a graph; {way_out}"
            )
    outputs = list(ts_graph.outputs())
    graph.output(arg(outputs[0]) if len(outputs) == 1 else tuple(arg(o) for o in outputs))
    return fx.GraphModule(ts, graph)


def _torch_function(qualified: str, way_out: str) -> tuple[Callable[..., Any], list[str]]:
    """The torch function a TorchScript ``prim::CallFunction`` calls (``__torch__.torch.nn.functional.relu6``)
    and its parameter names. Only ``torch.nn.functional``'s: the name comes from the file, and a file may define
    a function of its own under any name (``torch.hub.load``), which must not become a call of torch's."""
    module_name, _, name = qualified.removeprefix("__torch__.").rpartition(".")
    fn = getattr(F, name, None) if module_name == "torch.nn.functional" and not name.startswith("_") else None
    if not callable(fn) or getattr(fn, "__module__", None) != "torch.nn.functional":
        raise UntraceableModelError(
            f"the TorchScript forward calls the scripted function {qualified.removeprefix('__torch__.')}, which "
            f"splitexport cannot rebuild as a graph; {way_out}"
        )
    return fn, list(inspect.signature(fn).parameters)


def _aten_call(node: Any, values: list[Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The op overload of a TorchScript ``aten::`` node, with keyword-only arguments passed by name."""
    packet = getattr(torch.ops.aten, node.kind().split("::")[1])
    try:
        schema = torch._C.parse_schema(node.schema())
    except Exception:  # noqa: BLE001 - no schema: call the packet positionally
        return packet, tuple(values), {}
    op = getattr(packet, schema.overload_name or "default", packet)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for spec, value in zip(schema.arguments, values):
        if spec.kwarg_only:
            kwargs[spec.name] = value
        else:
            args.append(value)
    return op, tuple(args), kwargs
