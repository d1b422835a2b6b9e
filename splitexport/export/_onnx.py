"""ONNX Runtime on-device training artifacts for a bundle's device segments.

For each device segment (A and C of a double split, A of a single split) this
writes, under ``<bundle>/onnx/<segment>/``:

``training_model.onnx``
    One training step. A segment that trains on a received gradient takes
    ``(input, grad_output)`` and minimises ``sum(output * grad_output)``, whose
    gradient at ``output`` is exactly ``grad_output`` - the gradient of the
    auxiliary loss ``0.5 * sum((output - t)^2)``, ``t = output - grad_output``
    (see ``splitexport._update_rule``) without its cancellation error. The last
    segment takes ``(input, labels)``, minimises the mean label loss and returns
    ``(loss, input_gradient, output)``.
``forward_model.onnx``
    The training-mode forward (BatchNorm on batch statistics) that produces the
    activation to send; it does not touch the running statistics, which only the
    training step updates (torch's rule, unbiased variance).
``eval_model.onnx``
    The inference-mode forward (running statistics, no dropout).
``optimizer_model.onnx``, ``checkpoint``
    ONNX Runtime's SGD (``w -= lr * g``) or AdamW, and the initial parameters and
    BatchNorm statistics. ``.ort`` copies of the models on request.

All models take the parameters from the checkpoint, so one checkpoint state
serves the three models (see ``device_runtime.OrtSegment``).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from .._errors import ExportError
from .._manifest import DefenceSpec, OptimizerSpec
from .._update_rule import LossKind
from . import _onnx_defence as defences
from . import _onnx_graph as graph
from ._onnx_ops import UnsupportedOpError, check_trainable
from ._onnx_rewrite import DropoutMask, draw_mask, prepare

if TYPE_CHECKING:
    from .._bundle import Bundle

__all__ = ["ARTIFACTS", "DeviceOptimizer", "export_onnx", "export_segment_onnx"]

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 15, 20
ARTIFACTS = ("training_model", "forward_model", "eval_model", "optimizer_model", "checkpoint")
"""Artifact kinds per segment (``<kind>_ort`` for the ``.ort`` copies of the models)."""
FORMAT = "onnx"
MASKS_METADATA = "splitexport.dropout_masks"
"""Forward-model metadata listing the dropout mask inputs (read by ``device_runtime.OrtSegment``)."""


@dataclass(frozen=True)
class DeviceOptimizer:
    """The optimizer baked into ``optimizer_model.onnx`` (the learning rate is set at run time).

    ONNX Runtime offers plain SGD (``w -= lr * g``) and AdamW. Its AdamW kernel
    has two formulas: ``adamw_mode="hf"`` (what ``onnxblock`` generates: Hugging
    Face's, ``eps`` added to ``sqrt(v)`` before the bias correction and the weight
    decay applied after the update) and ``"torch"`` (``torch.optim.AdamW``: decay
    first, ``eps`` added to ``sqrt(v_hat)``). The default is ``"torch"`` so device
    segments train like the torch segments on the server.
    """

    name: Literal["sgd", "adamw"]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adamw_mode: Literal["torch", "hf"] = "torch"

    @classmethod
    def from_spec(
        cls,
        spec: OptimizerSpec,
        *,
        name: str | None = None,
        lr: float | None = None,
        adamw_mode: Literal["torch", "hf"] = "torch",
    ) -> DeviceOptimizer:
        """Map the bundle's optimizer (or an explicit ``name``) onto what ONNX Runtime provides."""
        rate = spec.lr if lr is None else lr
        if rate <= 0:
            raise ExportError(f"the learning rate must be positive, got {rate}")
        chosen = name or spec.name
        if chosen == "sgd":
            if name is None and (spec.momentum or spec.weight_decay):
                raise ExportError(
                    f"ONNX Runtime's SGD is plain `w -= lr * g`, but the bundle's optimizer is SGD with "
                    f"momentum={spec.momentum}, weight_decay={spec.weight_decay}; export with `--optimizer sgd` "
                    "to train the device segments with plain SGD, or `--optimizer adamw`"
                )
            return cls("sgd", rate)
        if chosen == "adam":
            if spec.weight_decay:
                raise ExportError(
                    f"ONNX Runtime has no Adam with L2 weight decay (the bundle has weight_decay={spec.weight_decay}); "
                    "export with `--optimizer adamw` (decoupled weight decay) or `--optimizer sgd`"
                )
            return cls("adamw", rate, tuple(spec.betas), spec.eps, 0.0, adamw_mode)  # type: ignore[arg-type]
        if chosen == "adamw":
            return cls("adamw", rate, tuple(spec.betas), spec.eps, spec.weight_decay, adamw_mode)  # type: ignore[arg-type]
        raise ExportError(f"unknown device optimizer {chosen!r}; ONNX Runtime offers 'sgd' and 'adamw'")

    def matches(self, spec: OptimizerSpec) -> bool:
        """Whether ``spec`` trains like these artifacts (up to the learning rate, set at run time)."""
        try:
            other = DeviceOptimizer.from_spec(spec, adamw_mode=self.adamw_mode)
        except ExportError:
            return False
        if self.name == "sgd":
            return other.name == "sgd"
        return replace_lr(other, self.lr) == self

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceOptimizer:
        return cls(
            data["name"],
            float(data["lr"]),
            tuple(data["betas"]),  # type: ignore[arg-type]
            float(data["eps"]),
            float(data["weight_decay"]),
            data.get("adamw_mode", "torch"),
        )


def replace_lr(opt: DeviceOptimizer, lr: float) -> DeviceOptimizer:
    return DeviceOptimizer(opt.name, lr, opt.betas, opt.eps, opt.weight_decay, opt.adamw_mode)


def export_segment_onnx(
    module: nn.Module,
    sample_shape: tuple[int, ...],
    out_dir: str | Path,
    *,
    is_last: bool,
    optimizer: DeviceOptimizer,
    loss: LossKind = "cross_entropy",
    name: str = "segment",
    opset: int = DEFAULT_OPSET,
    batch_size: int | None = None,
    ort_format: bool = False,
    check: bool = True,
    dtype: torch.dtype = torch.float32,
    masks_out: list[DropoutMask] | None = None,
    defence: DefenceSpec | None = None,
) -> dict[str, Path]:
    """Write the training artifacts of one segment to ``out_dir``; returns kind -> path.

    ``sample_shape`` is the input shape without the batch. The batch dimension
    is dynamic unless ``batch_size`` fixes it. ``module`` is not changed (its
    BatchNorm statistics are restored after the tracing forward pass).
    ``check`` runs one training step, forward and evaluation on random data
    before returning, so broken artifacts fail here and not on a phone.
    ``dtype`` is the input's (int64/int32 token ids for a first segment that
    embeds them). Layers ORT cannot train as exported are rewritten first
    (:mod:`._onnx_rewrite`); a segment trained on a received gradient gets one
    ``dropout_mask_<k>`` input per Dropout, appended to ``masks_out``.
    ``defence`` (the first segment, trained on a gradient): NoPeek's term in the training loss and the
    activation noise as a forward-model input (:mod:`._onnx_defence`).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    if batch_size is not None and batch_size < 1:
        raise ExportError(f"--batch-size must be positive, got {batch_size}")
    if defence is not None and not defence.active:
        defence = None
    if defence is not None and is_last:
        raise ExportError(f"segment {name}: the defences apply to the first segment, which trains on a gradient")
    if defence is not None and defence.nopeek > 0 and not dtype.is_floating_point:
        raise ExportError(f"segment {name}: NoPeek needs float inputs, not {dtype} token ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, eval_base, trainable, frozen, masks = _torch_to_onnx(
        module, sample_shape, opset, batch_size, dtype=dtype, trains_on_gradient=not is_last, segment=name
    )
    modules = dict(module.named_modules())
    for model, trains in ((base, not is_last), (eval_base, False)):
        check_trainable(
            model, modules, segment=name, opset=opset, dynamic_batch=batch_size is None, trains_on_gradient=trains
        )
    stats = graph.running_statistics(base)
    params = trainable + frozen + stats
    batch: int | str = batch_size if batch_size is not None else "batch"

    paths = {kind: out / f"{kind}.onnx" for kind in ARTIFACTS if kind != "checkpoint"}
    paths["checkpoint"] = out / "checkpoint"

    forward = copy.deepcopy(base)
    if masks:
        helper.set_model_props(forward, {MASKS_METADATA: json.dumps([m.to_json() for m in masks])})
    graph.isolate_batchnorm_statistics(forward, update=False)
    graph.move_initializers_to_inputs(forward, params)
    if defence is not None:
        defences.add_activation_noise(forward, defence)
    _save(forward, paths["forward_model"])

    evaluation = copy.deepcopy(eval_base)
    graph.to_inference_mode(evaluation)
    graph.move_initializers_to_inputs(evaluation, params)
    _save(evaluation, paths["eval_model"])

    training = copy.deepcopy(base)
    graph.isolate_batchnorm_statistics(training, update=True)
    _build_training_artifacts(
        training,
        paths,
        trainable=trainable,
        frozen=frozen + stats,
        is_last=is_last,
        loss=loss,
        optimizer=optimizer,
        opset=opset,
        batch=batch,
        segment=name,
        nopeek=0.0 if defence is None else defence.nopeek,
    )
    if ort_format:
        paths.update(_to_ort_format(paths, out))
    if check:
        _smoke_test(paths, sample_shape, batch_size, is_last=is_last, loss=loss, segment=name, dtype=dtype, masks=masks,
                    noise=defence is not None and defence.activation_noise > 0)
    if masks_out is not None:
        masks_out.extend(masks)
    return paths


def example_input(sample_shape: tuple[int, ...], batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A real example of the segment's input: zeros for token ids (always a valid id), else standard normal."""
    if dtype.is_floating_point:
        return torch.randn((batch, *sample_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.zeros((batch, *sample_shape), dtype=dtype)


def _torch_to_onnx(
    module: nn.Module,
    sample_shape: tuple[int, ...],
    opset: int,
    batch_size: int | None,
    *,
    dtype: torch.dtype,
    trains_on_gradient: bool,
    segment: str,
) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str], list[str], list[DropoutMask]]:
    """Training-mode ONNX export with parameter names kept.

    Returns (model, inference-mode model source, trainable, frozen, dropout masks); the two
    models differ only when dropout masks are inputs of the first.
    """
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    was_training = module.training
    example = example_input(sample_shape, batch_size or 2, dtype)
    try:
        prepared = prepare(module, example, trains_on_gradient=trains_on_gradient)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"segment {segment}: {exc}", op=exc.op, layer=exc.layer) from None
    finally:
        module.load_state_dict(state)
        module.train(was_training)
    masks = prepared.masks
    try:
        model = _export(prepared.train, example, masks, opset, batch_size)
        eval_model = model if prepared.eval is prepared.train else _export(prepared.eval, example, [], opset, batch_size)
    finally:
        module.load_state_dict(state)  # the tracing forward moved the BatchNorm statistics
        module.train(was_training)
    named = dict(module.named_parameters())
    for m in (model, eval_model):
        # The exporter captured the statistics after its forward pass; store the true ones.
        for init in m.graph.initializer:
            if init.name in state:
                init.CopyFrom(onnx.numpy_helper.from_array(state[init.name].numpy(), init.name))
        graph.remove_dead_nodes(m)
        graph.complete_layer_norm_outputs(m)
        inits = graph.initializer_names(m)
        missing = [k for k in named if k not in inits]
        if missing:
            raise ExportError(
                f"segment {segment}: parameters {missing[:5]} are not named in the ONNX export (renamed or folded); "
                "they could not be trained on the device"
            )
    trainable = [k for k, p in named.items() if p.requires_grad]
    frozen = [k for k, p in named.items() if not p.requires_grad]
    return model, eval_model, trainable, frozen, masks


def _export(
    module: nn.Module, example: torch.Tensor, masks: list[DropoutMask], opset: int, batch_size: int | None
) -> onnx.ModelProto:
    """``torch.onnx.export`` (legacy, training mode) of ``module(input, *masks)``."""
    n = example.shape[0]
    args = (example, *(torch.ones((n, *m.shape)) / (1.0 - m.p) for m in masks))
    names = [graph.INPUT, *(m.name for m in masks)]
    dynamic = {name: {0: "batch"} for name in [*names, graph.OUTPUT]}
    tmp = tempfile.TemporaryDirectory(prefix="splitexport-trace-")
    path = Path(tmp.name) / "segment.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.train(),
                args,
                os.fspath(path),
                dynamo=False,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                opset_version=opset,
                input_names=names,
                output_names=[graph.OUTPUT],
                dynamic_axes=None if batch_size else dynamic,
            )
        return onnx.load(os.fspath(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ExportError(
            f"torch.onnx.export failed: {type(exc).__name__}: {first}; cut the model so that the layer using "
            "this op runs on the server"
        ) from exc
    finally:
        tmp.cleanup()


def _build_training_artifacts(
    model: onnx.ModelProto,
    paths: dict[str, Path],
    *,
    trainable: list[str],
    frozen: list[str],
    is_last: bool,
    loss: LossKind,
    optimizer: DeviceOptimizer,
    opset: int,
    batch: int | str,
    segment: str,
    nopeek: float = 0.0,
) -> None:
    from onnxruntime.training import onnxblock

    out_spec = next(o for o in model.graph.output if o.name == graph.OUTPUT)
    # a dim the exporter could not infer stays symbolic (0 would be a fixed, wrong size)
    out_dims: list[int | str] = [batch] + [
        d.dim_value or d.dim_param or f"{graph.OUTPUT}_dim{i}" for i, d in enumerate(out_spec.type.tensor_type.shape.dim[1:], 1)
    ]

    class _Step(onnxblock.TrainingBlock):  # type: ignore[misc]
        def build(self, output: str) -> Any:
            g = self.base.graph
            if not is_last:
                g.input.append(helper.make_tensor_value_info(graph.GRAD_OUTPUT, TensorProto.FLOAT, out_dims))
                product = onnxblock.blocks.Mul()(output, graph.GRAD_OUTPUT)
                total = onnxblock.blocks.ReduceSum(keepdims=False)(product)
                return defences.add_nopeek(g, total, weight=nopeek, opset=opset) if nopeek > 0 else total
            # the loss blocks add the ``labels`` input: int64 [batch] or float like the output
            if loss == "cross_entropy":
                value = onnxblock.loss.CrossEntropyLoss(reduction="mean")(output, graph.LABELS)
            else:
                value = onnxblock.loss.MSELoss(reduction="mean")(output, graph.LABELS)
            return value, output

    block = _Step()
    for name in trainable:
        block.requires_grad(name, True)
    if is_last:
        block.requires_grad(graph.INPUT, True)
    for name in frozen:
        block.requires_grad(name, False)
    with _quiet_native("building the training graph of segment " + segment):
        with onnxblock.base(model):
            block(graph.OUTPUT)
            training, _ = block.to_model_proto()
        params = block.parameters()
        if is_last:
            graph.expose_input_gradient(training)
            params = ([p for p in params[0] if p.name != graph.INPUT], params[1])
        _save(training, paths["training_model"])
        onnxblock.save_checkpoint(params, os.fspath(paths["checkpoint"]))
        opt_block = (
            onnxblock.optim.SGD()
            if optimizer.name == "sgd"
            else onnxblock.optim.AdamW(
                bias_correction=True, betas=optimizer.betas, eps=optimizer.eps, weight_decay=optimizer.weight_decay
            )
        )
        with onnxblock.empty_base(opset_version=opset):
            opt_block(params)
            opt_model = opt_block.to_model_proto()
        if optimizer.name == "adamw":
            _set_adamw_mode(opt_model, 0 if optimizer.adamw_mode == "torch" else 1)
        _save(opt_model, paths["optimizer_model"])


def _set_adamw_mode(model: onnx.ModelProto, mode: int) -> None:
    """Pick the formula of ORT's AdamWOptimizer kernel (0: torch.optim.AdamW, 1: Hugging Face)."""
    nodes = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    if not nodes:
        raise ExportError("the generated optimizer model has no AdamWOptimizer node")
    for node in nodes:
        attrs = [a for a in node.attribute if a.name == "adam_mode"]
        if attrs:
            attrs[0].i = mode
        else:
            node.attribute.append(helper.make_attribute("adam_mode", mode))


def _save(model: onnx.ModelProto, path: Path) -> None:
    graph.ensure_ir_version(model)
    onnx.save(model, os.fspath(path))


def _to_ort_format(paths: dict[str, Path], out: Path) -> dict[str, Path]:
    """``.ort`` copies of the models, as ``generate_artifacts(ort_format=True)`` makes them."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    result: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in list(paths.items()):
            if path.suffix != ".onnx":
                continue
            src = Path(tmp) / path.name
            src.write_bytes(path.read_bytes())
            with _quiet_native(f"converting {path.name} to the ORT format"):
                convert_onnx_models_to_ort(src, output_dir=out, optimization_styles=[OptimizationStyle.Fixed])
            ort = out / f"{path.stem}.ort"
            if not ort.is_file():
                raise ExportError(f"converting {path.name} to the ORT format produced no {ort.name}")
            result[f"{kind}_ort"] = ort
    for extra in out.glob("*.config"):  # the converter's required-operators lists
        extra.unlink()
    return result


def _smoke_test(
    paths: dict[str, Path],
    sample_shape: tuple[int, ...],
    batch_size: int | None,
    *,
    is_last: bool,
    loss: LossKind,
    segment: str,
    dtype: torch.dtype = torch.float32,
    masks: list[DropoutMask] | None = None,
    noise: bool = False,
) -> None:
    """Load the artifacts and run every model once on random data (nothing is written)."""
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    n = batch_size or 3
    rng = np.random.default_rng(0)
    x = example_input(sample_shape, n, dtype).numpy()
    drawn = [draw_mask(rng, n, m) for m in masks or []]
    try:
        with _quiet_native(f"checking the artifacts of segment {segment}"):
            state = CheckpointState.load_checkpoint(os.fspath(paths["checkpoint"]))
            module = Module(os.fspath(paths["training_model"]), state, os.fspath(paths["eval_model"]))
            Optimizer(os.fspath(paths["optimizer_model"]), module)
            forward = Module(os.fspath(paths["training_model"]), state, os.fspath(paths["forward_model"]))
            if noise:  # the forward model takes the noise, shaped like the (eval model's) output
                clean = module.eval()(x)
                out = forward.eval()(x, *drawn, rng.standard_normal(clean.shape).astype(np.float32))
            else:
                out = forward.eval()(x, *drawn)
            if is_last:
                labels: np.ndarray = (
                    rng.integers(0, out.shape[1], size=n).astype(np.int64)
                    if loss == "cross_entropy"
                    else rng.standard_normal(out.shape).astype(np.float32)
                )
                module.train()(x, labels)
            else:
                module.train()(x, *drawn, np.ones_like(out))
            module.eval()(x)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"segment {segment}: the ONNX Runtime artifacts do not run: {type(exc).__name__}: {exc}"
        ) from exc


@contextmanager
def _quiet_native(what: str) -> Iterator[None]:
    """Capture ONNX Runtime's chatter (native logs on fds 1/2, Python prints); show it if ``what`` fails."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.WARNING))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        failure: Exception | None = None
        try:
            with redirect_stdout(io.StringIO()):
                yield
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with ORT's log below
            failure = exc
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            root.setLevel(previous)
        if failure is not None:
            log.seek(0)
            lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
            detail = ("\nONNX Runtime said:\n  " + "\n  ".join(lines[-5:])) if lines else ""
            raise ExportError(f"{what} failed: {type(failure).__name__}: {failure}{detail}") from failure


def export_onnx(
    bundle: Bundle | str | Path,
    *,
    optimizer: str | OptimizerSpec | None = None,
    lr: float | None = None,
    ort_format: bool = False,
    opset: int = DEFAULT_OPSET,
    batch_size: int | None = None,
) -> Bundle:
    """Export every device segment of ``bundle`` and record the artifacts (with sha256) in its manifest.

    ``optimizer`` (an :class:`OptimizerSpec`, or the name ``"sgd"`` / ``"adamw"``) and ``lr``
    override the bundle's optimizer; without them its settings must map onto ONNX Runtime's.
    """
    from .._bundle import Bundle, load_bundle

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    manifest = b.manifest
    if isinstance(optimizer, OptimizerSpec):
        device_opt = DeviceOptimizer.from_spec(optimizer, lr=lr)
    else:
        device_opt = DeviceOptimizer.from_spec(manifest.optimizer, name=optimizer, lr=lr)
    files: dict[str, dict[str, Path]] = {}
    masks: dict[str, list[DropoutMask]] = {}
    with tempfile.TemporaryDirectory(prefix="splitexport-onnx-") as tmp:
        for spec in manifest.device_segments:
            masks[spec.name] = []
            files[spec.name] = export_segment_onnx(
                b.torch_segment(spec.name),
                spec.input.sample_shape,
                Path(tmp) / spec.name,
                is_last=spec.is_last,
                optimizer=device_opt,
                loss=manifest.loss.kind,
                name=spec.name,
                opset=opset,
                batch_size=batch_size,
                ort_format=ort_format,
                dtype=spec.input.torch_dtype,
                masks_out=masks[spec.name],
                defence=manifest.defence if spec.index == 0 else None,
            )
        import onnxruntime

        options: dict[str, object] = {
            "onnxruntime": onnxruntime.__version__,
            "opset": opset,
            "batch_size": batch_size,
            "ort_format": ort_format,
            "optimizer": device_opt.to_json(),
            "inputs": {"gradient": [graph.INPUT, graph.GRAD_OUTPUT], "labels": [graph.INPUT, graph.LABELS]},
            "outputs": {"gradient": ["loss"], "labels": ["loss", graph.INPUT_GRADIENT, graph.OUTPUT]},
            "gradient_loss": "sum(output * grad_output)",
            "dropout_masks": {k: [m.to_json() for m in v] for k, v in masks.items() if v},
        }
        if manifest.defence.active:
            options["defence"] = {"segment": manifest.segments[0].name, **manifest.defence.model_dump(mode="json"),
                                  "noise_input": defences.NOISE_INPUT if manifest.defence.activation_noise > 0 else None}
        b.add_artifacts(FORMAT, files, options)
    return b
