"""The op table's types: :class:`OpSpec` (a torch op and how each format handles it) and
:class:`LayerKind` (one kind of the layer-graph IR and its Keras / TensorFlow implementations).

A family module (``conv``, ``norm``, ...) defines its specs and kinds and registers them
with :data:`REGISTRY`; the readers of :mod:`.._layergraph`, the Keras builder and the
TFLite graphs dispatch through it. TensorFlow and tf_keras are imported on first use
(:data:`tf`, :data:`keras_layers`), so reading the table needs neither.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..._errors import ExportError

if TYPE_CHECKING:
    from torch._ops import OpOverload

    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

__all__ = [
    "REGISTRY",
    "FormatSupport",
    "KerasContext",
    "LayerKind",
    "OpSpec",
    "Registry",
    "keras_layers",
    "tf",
]

Status = Literal["native", "decomposed", "refused"]


class _Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


tf: Any = _Lazy("tensorflow")
"""``tensorflow``, imported when a TFLite graph is built."""
keras_layers: Any = _Lazy("tf_keras.layers")
"""``tf_keras.layers``, imported when a Keras model is built."""


@dataclass(frozen=True)
class FormatSupport:
    """How one format handles an op: ``native``, ``decomposed`` into supported ops, or ``refused``."""

    status: Status
    how: str = ""
    """The format's op / layer / graph, or the reason it is refused, and the way out."""

    def cell(self) -> str:
        return f"{self.status}: {self.how}" if self.how else self.status


def native(how: str = "") -> FormatSupport:
    return FormatSupport("native", how)


def decomposed(how: str) -> FormatSupport:
    return FormatSupport("decomposed", how)


def refused(why: str) -> FormatSupport:
    return FormatSupport("refused", why)


ModuleBuild = Callable[["_Builder", "_Node", Any, "Layer"], None]
"""Maps a call of a torch module (node, module, its input layer) into the IR."""
FunctionBuild = Callable[["_Builder", "_Node"], None]
"""Maps a call of a torch function / tensor method (args in ``node.args`` / ``node.kwargs``) into the IR."""


@dataclass(frozen=True)
class OpSpec:
    """One torch op: the forms it matches, how every format handles it, and its IR mapping."""

    name: str
    """Display name (the torch module class where there is one)."""
    family: str
    onnx: FormatSupport
    tfjs: FormatSupport
    tflite_flex: FormatSupport
    tflite_builtin: FormatSupport
    restrictions: str = ""
    modules: tuple[str, ...] = ()
    """torch module class names (``type(m).__name__`` / TorchScript ``original_name``)."""
    fn: str = ""
    """Canonical function name of the functional forms (node op name in the IR reader)."""
    functions: tuple[Any, ...] = ()
    """fx ``call_function`` targets (``torch.relu``, ``operator.add``, ...)."""
    methods: tuple[str, ...] = ()
    """fx ``call_method`` names (``x.relu()``)."""
    aten: tuple[str, ...] = ()
    """ATen ops, spelled as ``torch.ops`` names them: ``aten.relu`` (every overload) or ``aten.arange.default``
    (that overload only). A bundle's TorchScript segment is read as fx with these calls
    (:func:`splitexport._loading.torchscript_to_fx`)."""
    aten_args: tuple[str, ...] = ()
    """Names the builder reads the aten call's arguments by, in the schema's order (the first is the tensor)."""
    build_module: ModuleBuild | None = None
    build_function: FunctionBuild | None = None
    kinds: tuple[str, ...] = ()
    """IR layer kinds the mapping produces."""

    def torch_forms(self) -> list[str]:
        forms = [f"nn.{m}" for m in self.modules]
        forms += [_function_name(f) for f in self.functions]
        forms += [f"Tensor.{m}()" for m in self.methods]
        return list(dict.fromkeys(forms))


def _function_name(f: Any) -> str:
    mod = getattr(f, "__module__", "") or ""
    name = getattr(f, "__name__", str(f))
    if mod in ("_operator", "operator"):
        return {"add": "a + b", "mul": "a * b", "matmul": "a @ b", "truediv": "a / b", "sub": "a - b"}.get(
            name, f"operator.{name}"
        )
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


@dataclass
class KerasContext:
    """What a kind's Keras builder may use: ``L`` (tf_keras.layers) and the weights to set after building."""

    L: Any
    weights: list[tuple[Any, list[Any]]] = field(default_factory=list)

    def set_weights(self, layer: Any, values: list[Any]) -> None:
        self.weights.append((layer, values))


KerasBuild = Callable[[KerasContext, "Layer", list[Any]], Any]
"""Builds the Keras layer(s) of one IR layer on the input tensors; returns the output tensor."""
TfForward = Callable[["TfSegment", "Layer", list[Any], str, bool], tuple[Any, dict[str, Any]]]
"""TF forward: (segment, layer, inputs, mode "train"/"eval", update BN stats) -> (output, cache extras)."""
TfBackward = Callable[["TfSegment", "Layer", "_Cache", Any, dict[str, Any]], list[Any]]
"""Builtin-ops backward: (segment, layer, cache, dL/d(out), weight-gradient dict to fill) -> dL/d(inputs)."""


def _no_refusal(layer: Layer) -> str | None:
    return None


def _identity_layout(layer: Layer, key: str) -> str:
    return "identity"


@dataclass(frozen=True)
class LayerKind:
    """One IR layer kind and its TF.js (Keras) and TFLite (forward, builtin backward) implementations."""

    name: str
    keras: KerasBuild
    forward: TfForward
    backward: TfBackward
    builtin_refusal: Callable[[Layer], str | None] = _no_refusal
    """Why the builtin-ops TFLite variant cannot train this layer (``None``: it can)."""
    layout: Callable[[Layer, str], str] = _identity_layout
    """Layout transform of a weight key (see :func:`..._layergraph.torch_to_tf_layout`)."""
    after_step: Callable[[TfSegment, Layer], None] | None = None
    """State update after every training step (e.g. advancing a dropout seed)."""


class Registry:
    """Every :class:`OpSpec` and :class:`LayerKind`, with the lookups the readers need."""

    def __init__(self) -> None:
        self.ops: list[OpSpec] = []
        self.kinds: dict[str, LayerKind] = {}
        self._modules: dict[str, OpSpec] = {}
        self._functions: dict[Any, OpSpec] = {}
        self._methods: dict[str, OpSpec] = {}
        self._aten: dict[str, OpSpec] = {}
        self._fn: dict[str, OpSpec] = {}

    def register(self, *items: OpSpec | LayerKind) -> None:
        for item in items:
            if isinstance(item, LayerKind):
                if item.name in self.kinds:
                    raise ValueError(f"layer kind {item.name!r} registered twice")
                self.kinds[item.name] = item
                continue
            if any(op.name == item.name for op in self.ops):
                raise ValueError(f"op {item.name!r} registered twice")
            self.ops.append(item)
            for m in item.modules:
                self._claim(self._modules, m, item)
            for f in item.functions:
                self._claim(self._functions, f, item)
            for m in item.methods:
                self._claim(self._methods, m, item)
            for a in item.aten:
                self._claim(self._aten, a, item)
            if item.fn:
                self._claim(self._fn, item.fn, item)

    @staticmethod
    def _claim(table: dict[Any, OpSpec], key: Any, op: OpSpec) -> None:
        if key in table:
            raise ValueError(f"{key!r} is claimed by both {table[key].name!r} and {op.name!r}")
        table[key] = op

    def for_module(self, class_name: str) -> OpSpec | None:
        return self._modules.get(class_name)

    def for_function(self, target: Any) -> OpSpec | None:
        try:
            return self._functions.get(target)
        except TypeError:  # unhashable target
            return None

    def for_method(self, name: str) -> OpSpec | None:
        return self._methods.get(name)

    def for_aten(self, op: OpOverload) -> OpSpec | None:
        """The op of an aten overload (``torch.ops.aten.add.Tensor``): listed by that overload or by its op."""
        return self._aten.get(str(op)) or self._aten.get(str(op.overloadpacket))

    def for_fn(self, fn: str) -> OpSpec | None:
        return self._fn.get(fn)

    def kind(self, name: str) -> LayerKind:
        try:
            return self.kinds[name]
        except KeyError:
            raise ExportError(f"no implementation registered for layer kind {name!r}") from None

    def supported_summary(self) -> str:
        """The ops the TF.js / TFLite exports accept (for error messages)."""
        return ", ".join(op.name for op in self.ops if op.tfjs.status != "refused")


REGISTRY = Registry()
"""The one op table."""


def register(*items: OpSpec | LayerKind) -> None:
    """Add ops and layer kinds to :data:`REGISTRY` (called by every family module at import)."""
    REGISTRY.register(*items)
