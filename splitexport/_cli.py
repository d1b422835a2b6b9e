"""The ``splitexport`` command line."""

from __future__ import annotations

import argparse
import pickle
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from . import _argtypes as at
from ._errors import SplitExportError
from ._manifest import LossSpec, Manifest, OptimizerSpec, PreprocessSpec
from ._partition import INPUT_DTYPES, example_input
from .strategies import STRATEGIES, StrategyConfig, hyperparameter_fields

if TYPE_CHECKING:
    from ._bundle import Bundle

EXIT_ERROR = 2
_ROUNDS = StrategyConfig.model_fields["total_rounds"]


def _flag_type(field: FieldInfo) -> Callable[[str], Any]:
    """The argument type of a hyperparameter flag, from its pydantic field (type and bounds)."""
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata
              if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}  # the flag types refuse inf and nan anyway
    kind = field.annotation if field.annotation in (int, float) else next(
        (t for t in typing.get_args(field.annotation) if t in (int, float)), None)
    if kind is int and not bounds:
        return int
    if kind is float:
        by_bounds: dict[tuple[tuple[str, Any], ...], Callable[[str], float]] = {
            (): at.finite_float, (("Ge", 0), ("Le", 1)): at.fraction, (("Gt", 0), ("Le", 1)): at.positive_fraction,
            (("Ge", 0),): at.non_negative_float, (("Gt", 0),): at.positive_float}
        found = by_bounds.get(tuple(sorted(bounds.items())))
        if found is not None:
            return found
    raise TypeError(f"no command-line type for a hyperparameter of type {field.annotation} with bounds {bounds}")


def _strategy_args(group: argparse._ArgumentGroup) -> None:
    """One flag per strategy hyperparameter (``--phase-rounds`` for ``phase_rounds``), generated from the
    strategies' ``Params``; unset flags are None, so the models' defaults apply."""
    for h in hyperparameter_fields().values():
        group.add_argument("--" + h.name.replace("_", "-"), type=_flag_type(h.field), default=None,
                           help=f"({', '.join(h.strategies)}) {h.field.description}"
                           + (f" (default {h.field.default})" if h.field.default is not None else ""))


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameter flags that were given."""
    return {k: v for k in hyperparameter_fields() if (v := getattr(args, k)) is not None}


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: message (got value)`` for each failing field."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e else "")
        for e in exc.errors()
    )


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-shape needs a batch and at least one more positive dim: {text!r}")
    return dims


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model file: state dict (+ --arch), TorchScript, .pt2, or pickle")
    p.add_argument("--input-shape", type=_shape, required=True, help="example input shape with batch, e.g. 1,1,8,8")
    p.add_argument("--input-dtype", choices=list(INPUT_DTYPES), default="float32",
                   help="dtype of the model input: int64/int32 for token ids (Embedding), default float32")
    p.add_argument("--arch", help="package.module:factory that builds the model (for a state dict)")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole nn.Module (runs code)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="built-in dataset (default digits) when no --data")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your data: .npz (x, y[, x_test, y_test]), .npy, .csv (with --target), or an image folder "
                   "(one subfolder per class); preprocessed as docs/bundle.md describes")
    p.add_argument("--target", default=None, metavar="COLUMN", help="the label column of a --data CSV")


def _optimizer_args(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    d = OptimizerSpec()
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=d.name if defaults else None)
    p.add_argument("--lr", type=at.positive_float, default=d.lr if defaults else None)
    p.add_argument("--momentum", type=at.non_negative_float, default=d.momentum if defaults else None)
    p.add_argument("--weight-decay", type=at.non_negative_float, default=d.weight_decay if defaults else None)


def _optimizer_from(args: argparse.Namespace, base: OptimizerSpec) -> OptimizerSpec:
    update = {
        k: v
        for k, v in {"name": args.optimizer, "lr": args.lr, "momentum": args.momentum,
                     "weight_decay": args.weight_decay}.items()
        if v is not None
    }
    try:
        return OptimizerSpec.model_validate({**base.model_dump(), **update})
    except ValidationError as exc:
        raise SplitExportError(f"invalid optimizer settings: {validation_message(exc)}") from exc


def cmd_inspect(args: argparse.Namespace) -> None:
    from ._loading import load_model
    from ._partition import list_cut_points

    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    points = list_cut_points(loaded.module, example_input(args.input_shape, args.input_dtype))
    print(f"{args.model} ({loaded.kind}), input {list(args.input_shape)} {args.input_dtype}: "
          f"{len(points)} valid cut points")
    header = f"{'cut after':<22} {'output shape':<18} {'bytes/sample':>12} {'params A':>10} {'params B':>10} {'FLOPs A':>11} {'FLOPs B':>11}"
    print(header)
    print("-" * len(header))
    for p in points:
        shape = "x".join(str(d) for d in p.output_shape[1:])
        print(f"{p.name:<22} {shape:<18} {p.bytes_per_sample:>12} {p.params_before:>10} {p.params_after:>10} "
              f"{p.flops_before:>11} {p.flops_after:>11}")
    print("(A = before the cut, B = after it; FLOPs are forward FLOPs per sample)")


def cmd_partition(args: argparse.Namespace) -> None:
    from ._bundle import write_bundle
    from ._loading import load_model
    from ._manifest import SourceSpec
    from ._partition import partition
    from .simulation.datafiles import given_preprocess, parse_preprocess, preprocess_for

    if args.target is not None and args.data is None:
        raise SplitExportError("--target needs --data PATH (a CSV)")
    given = parse_preprocess(args.preprocess) if args.preprocess is not None else None  # before the model loads
    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    part = partition(loaded.module, args.cut, example_input(args.input_shape, args.input_dtype))
    preprocess = None
    if args.data is not None or given is not None:

        def preprocess(m: Manifest) -> PreprocessSpec:
            fitted = preprocess_for(args.data, m, target=args.target) if args.data is not None else None
            if given is None:
                assert fitted is not None
                return fitted
            return given_preprocess(given, m, fitted)
    bundle = write_bundle(
        part,
        args.output,
        source=SourceSpec(file_name=args.model.name, sha256=loaded.sha256, kind=loaded.kind, arch=loaded.arch),
        loss=LossSpec(kind=args.loss),
        optimizer=_optimizer_from(args, OptimizerSpec()),
        force=args.force,
        preprocess=preprocess,
        defence=_defence_from(args, part),
    )
    print(f"wrote {bundle.path} ({part.split} split)")
    for seg in bundle.manifest.segments:
        print(f"  {seg.name} [{seg.role}] {seg.input.shape} -> {seg.output.shape}, {seg.parameters} params, "
              f"modules {', '.join(seg.modules)}")


def _defence_from(args: argparse.Namespace, part: Any) -> Any:
    """``--nopeek`` / ``--activation-noise`` as the manifest's DefenceSpec (checked against the partition)."""
    from ._manifest import DefenceSpec

    spec = DefenceSpec(nopeek=args.nopeek, activation_noise=args.activation_noise)
    if spec.nopeek > 0 and not part.segments[0].input_dtype.is_floating_point:
        raise SplitExportError("--nopeek needs float inputs: the distance correlation with token ids "
                               f"({part.segments[0].input_dtype}) is not defined here; use --activation-noise")
    if spec.active and part.segments[0].role != "device":
        raise SplitExportError("the defences apply to the first segment, which must run on the device")
    return spec


def cmd_plan(args: argparse.Namespace) -> None:
    """``splitexport plan``: measured and predicted cost of every cut (docs/plan.md)."""
    import json
    import tempfile

    from ._loading import load_model
    from ._plan import Link, format_table, plan, plot_plan, resolve_profile

    if args.target is not None and args.data is None:
        raise SplitExportError("--target needs --data PATH (a CSV)")
    profile = resolve_profile(args.device_profile, args.device_flops)
    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    example = example_input(args.input_shape, args.input_dtype)
    data = _plan_data(args, loaded.module, example, tempfile.gettempdir()) \
        if args.attack or not args.train_samples else None
    samples = args.train_samples or int(data.x_train.shape[0])  # type: ignore[union-attr]
    attack = None
    if args.attack:
        assert data is not None
        x = data.x_train[: args.attack_samples]
        y = data.y_train[: args.attack_samples] if args.loss == "cross_entropy" else None
        attack = (x, y)
    result = plan(loaded.module, example, double=args.double, batch=args.batch_size, train_samples=samples,
                  link=Link(args.bandwidth, args.rtt), profile=profile, optimizer=args.optimizer,
                  loss=args.loss, threads=args.threads, reps=args.reps, attack=attack)
    print(format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps(result.to_json(), indent=2))
    png = plot_plan(result, args.out / "plan.png")
    best = [c.label for c in result.candidates if c.pareto]
    print(f"Pareto-best: {', '.join(best)}; wrote {args.out / 'plan.json'} and {png}")


def _plan_data(args: argparse.Namespace, module: Any, example: Any, tmp: str) -> Any:
    """--data (prepared and checked against the model, via a throw-away bundle) or the built-in dataset."""
    if args.data is None:
        from .simulation.data import load_dataset

        return load_dataset(args.dataset)
    import tempfile

    from ._bundle import write_bundle
    from ._manifest import SourceSpec
    from ._partition import list_cut_points, partition
    from .simulation.datafiles import resolve_data

    part = partition(module, [list_cut_points(module, example)[0].name], example)
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        b = write_bundle(part, Path(d) / "b", source=SourceSpec(file_name=args.model.name, sha256="0" * 64,
                                                                 kind="state_dict"), loss=LossSpec(kind=args.loss))
        return resolve_data(args.dataset, b.manifest, data=args.data, target=args.target)


def cmd_simulate(args: argparse.Namespace) -> None:
    from ._bundle import load_bundle
    from .simulation import simulate

    bundle = load_bundle(args.bundle)
    if args.clients is not None or args.strategy is not None:
        _simulate_clients(args, bundle)
        return
    simulate(
        bundle,
        dataset=args.dataset,
        data=args.data,
        target=args.target,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        optimizer=_optimizer_from(args, bundle.manifest.optimizer),
        device_runtime=args.device_runtime,
        out_dir=args.out,
        progress=not args.no_progress,
    )


def _simulate_clients(args: argparse.Namespace, bundle: Bundle) -> None:
    """``simulate --clients N --strategy S``: multi-client split learning in process."""
    from .simulation import simulate_clients, write_results
    from .simulation.datafiles import resolve_data

    data = resolve_data(args.dataset, bundle.manifest, data=args.data, target=args.target)

    strategy, clients = args.strategy or "psl", args.clients or 2
    link: Any = None
    if args.server is not None:  # the devices run here, B on `splitexport serve --strategy`
        try:
            from device_runtime import HttpLink, ServerClient, ServerError
        except ImportError as exc:
            raise SplitExportError(f"--server needs the 'server' extra: pip install 'splitexport[server]' ({exc})") from exc
        probe = ServerClient(args.server, args.token, max_wait_s=10)
        try:  # check before opening sessions: the server's first iteration waits for its clients' sessions
            info = probe.request("GET", "/v1/strategy").json()
        except ServerError as exc:
            raise SplitExportError(f"server {args.server}: {exc}") from exc
        finally:
            probe.close()
        served, expected = info["strategy"], info["num_clients"]
        if args.strategy is not None and args.strategy != served or clients != expected:
            raise SplitExportError(f"the server at {args.server} runs {served} for {expected} clients; pass "
                                   f"--strategy {served} --clients {expected}")
        strategy = served
        link = HttpLink(args.server, clients, args.token)
    try:
        result = simulate_clients(
            bundle, strategy=strategy, clients=clients, partition=args.client_data,
            rounds=args.rounds, batch_size=args.batch_size, seed=args.seed, dataset=data,
            optimizer=_optimizer_from(args, bundle.manifest.optimizer), link=link, progress=not args.no_progress,
            log=print, **_hyperparameters(args),
        )
    finally:
        if link is not None:
            link.close()
    metrics, plot = write_results([result], args.out, title=f"{result.strategy}, {result.clients} clients, "
                                  f"{result.partition} on {data.name}")
    print(f"final test accuracy {result.final_accuracy:.4f}, traffic {result.total_bytes / 1e6:.2f} MB, "
          f"device FLOPs {result.device_flops:.3e}; wrote {plot} and {metrics}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The whole product path on the built-in default (see :mod:`splitexport._demo`)."""
    from ._demo import run_demo

    run_demo(args.out, run, model=args.model, epochs=args.epochs, seed=args.seed, tfjs=not args.no_tfjs, progress=not args.no_progress)


_EXPORTERS: dict[str, str] = {
    "onnx": "splitexport.export._onnx",
    "tfjs": "splitexport.export._tfjs",
    "tflite": "splitexport.export._tflite",
}


def _export_options(args: argparse.Namespace, bundle: Bundle) -> Any:
    """The typed options of ``splitexport export`` (the device optimizer: the bundle's, with ``--lr`` and, for
    ONNX, ``--optimizer sgd|adamw``)."""
    from .export import OnnxOptions, TfjsOptions, TfliteOptions

    spec = bundle.manifest.optimizer
    lr = args.lr if args.lr is not None else spec.lr
    if lr <= 0:
        raise SplitExportError(f"the learning rate must be positive, got {lr}")
    if args.format == "onnx":
        if args.optimizer == "sgd":
            if spec.momentum or spec.weight_decay:
                print(f"note: the device segments train with plain SGD; the bundle's optimizer (momentum={spec.momentum}, "
                      f"weight_decay={spec.weight_decay}) still applies to the server's segments", file=sys.stderr)
            opt = OptimizerSpec(name="sgd", lr=lr)
        else:
            opt = spec.model_copy(update={"lr": lr, **({"name": args.optimizer} if args.optimizer else {})})
        return OnnxOptions(optimizer=opt, opset=args.opset or 17, batch_size=args.batch_size,
                           ort_format=bool(args.ort_format))
    opt = spec.model_copy(update={"lr": lr})
    if args.format == "tfjs":
        return TfjsOptions(optimizer=opt)
    both = args.tflite_variant in (None, "both")
    return TfliteOptions(optimizer=opt, variants=("flex", "builtin") if both else (args.tflite_variant,), batch_size=int(args.batch_size or 32))


def cmd_export(args: argparse.Namespace) -> None:
    import importlib

    from ._bundle import load_bundle

    try:
        importlib.import_module(_EXPORTERS[args.format])
    except ImportError as exc:
        raise SplitExportError(
            f"the {args.format} exporter is not available in this installation ({exc}); "
            "install the extra it needs: pip install 'splitexport[onnx]' or 'splitexport[tf]'"
        ) from exc
    from .export import export

    bundle = load_bundle(args.bundle)
    b = export(bundle, args.format, _export_options(args, bundle))
    if args.format == "onnx":
        opt = b.manifest.exports["onnx"]["optimizer"]
        print(f"exported ONNX Runtime training artifacts to {b.path / 'onnx'} (optimizer {opt})")
        for spec in b.manifest.device_segments:
            print(f"  {spec.name} ({spec.trains_with}): {', '.join(sorted(spec.artifacts.get('onnx', {})))}")
        return
    for spec in b.manifest.device_segments:
        arts = spec.artifacts[args.format]
        if args.format == "tfjs":
            print(f"tfjs: segment {spec.name} -> {b.path / arts['model']}")
        else:
            print(f"tflite: segment {spec.name}: " + ", ".join(f"{k} -> {b.path / v}" for k, v in sorted(arts.items())))


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from server import ServerSettings, create_app, listen
    except ImportError as exc:
        raise SplitExportError(f"the server needs the 'server' extra: pip install 'splitexport[server]' ({exc})") from exc
    from ._bundle import load_bundle

    load_bundle(args.bundle)  # a clear error for a bad bundle before anything listens
    overrides = {k: v for k, v in {"bundle": args.bundle, "host": args.host, "port": args.port,
                                   "state_dir": args.state_dir, "tokens_file": args.tokens,
                                   "checkpoint_every": args.checkpoint_every, "threads": args.threads,
                                   "sqlite_synchronous": args.sync,
                                   "device": args.device,
                                   "strategy": args.strategy,
                                   "num_clients": args.clients, "round_timeout_s": args.round_timeout,
                                   **_hyperparameters(args),
                                   "total_rounds": args.rounds, "cors_origins": args.cors_origin,
                                   "app": args.app or None}.items() if v is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        raise SplitExportError(f"invalid server settings: {validation_message(exc)}") from exc
    if settings.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SplitExportError(f"--device {settings.device}: torch sees no CUDA device on this machine")
    if args.replicas is not None or args.distributed:  # B replicated over ranks (docs/scaling.md)
        from server.distributed import LaunchError, launch, refusal, serve_rank

        why = refusal(settings.strategy, settings.num_clients, args.replicas or 1)
        if why is not None:
            raise SplitExportError(why)
        try:
            if args.distributed:
                serve_rank(args, settings)
            elif (code := launch(args, settings)) != 0:
                raise SplitExportError(f"a replica exited with status {code}")
        except LaunchError as exc:
            raise SplitExportError(str(exc)) from exc
        return
    sock = listen(settings.host, settings.port)  # a port in use is one clear line, before B loads
    try:
        try:
            app = create_app(settings)
        except ValueError as exc:
            raise SplitExportError(str(exc)) from exc
        except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # torch.load of a damaged checkpoint
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SplitExportError(f"cannot restore the server state in {settings.state_dir}: {first}; move it "
                                   "away to start fresh, or pass another --state-dir") from exc
        # devices waiting for B or a barrier must not hold up a shutdown: their requests are cancelled after 3 s
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                                timeout_graceful_shutdown=3)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def cmd_deploy(args: argparse.Namespace) -> None:
    from ._bundle import deploy_bundle, load_bundle

    deployed = deploy_bundle(load_bundle(args.bundle), args.to, force=args.force)
    print(f"wrote {deployed.path}: {len(deployed.manifest.files)} device files "
          f"({', '.join(s.name for s in deployed.manifest.device_segments)})")


def _plan_profiles() -> list[str]:
    from ._plan import DEVICE_PROFILES

    return list(DEVICE_PROFILES)


def _plan_bandwidth(text: str) -> float:
    from ._plan import bandwidth

    return bandwidth(text)


def _plan_duration(text: str) -> float:
    from ._plan import duration

    return duration(text)


def build_parser() -> argparse.ArgumentParser:
    parser = at.OneLineParser(prog="splitexport", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list every valid cut point of a model")
    _model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("partition", help="cut a model into a split bundle")
    _model_args(p)
    p.add_argument("--cut", action="append", required=True, help="cut after this layer (repeat: A|B|C)")
    p.add_argument("-o", "--output", type=at.writable_dir, required=True, help="bundle directory to create")
    p.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--data", default=None, metavar="PATH", help="record the preprocessing fitted on this data "
                   "(scaling, per-channel mean/std, image size, labels) in the manifest")
    p.add_argument("--target", default=None, metavar="COLUMN", help="the label column of a --data CSV")
    p.add_argument("--preprocess", nargs="+", default=None, metavar="KEY=VALUE",
                   help="record this preprocessing (over what --data fits): kind=image|table|array|tokens, "
                   "scale=1/255, mean=0.485,0.456,0.406, std=..., image_size=H,W, channel_order=L|RGB, "
                   "feature_names=a,b, label_names=cat,dog, num_classes=N (docs/bundle.md)")
    p.add_argument("--nopeek", type=at.non_negative_float, default=0.0, metavar="W",
                   help="train A with NoPeek's distance correlation between its input and output, weight W "
                   "(docs/privacy.md; default 0: off)")
    p.add_argument("--activation-noise", type=at.non_negative_float, default=0.0, metavar="S",
                   help="add Gaussian noise of std S to A's output before it leaves the device, in training "
                   "(default 0: off)")
    _optimizer_args(p, defaults=True)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("plan", help="measure and predict step time, traffic and device memory of every cut")
    _model_args(p)
    _data_args(p)
    p.add_argument("--double", action="store_true", help="pairs of cuts (A|B|C, A and C on the device)")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--device-profile", choices=list(_plan_profiles()), default=None,
                   help="device class scaling the measured device time (default host: this machine)")
    prof.add_argument("--device-flops", type=at.positive_float, default=None, metavar="F",
                   help="the device's sustained fp32 matrix-multiply FLOP/s, instead of a profile")
    p.add_argument("--bandwidth", type=_plan_bandwidth, default="20mbit", help="link bandwidth, e.g. 20mbit (default)")
    p.add_argument("--rtt", type=_plan_duration, default="60ms", help="round-trip time, e.g. 60ms (default)")
    p.add_argument("--batch-size", type=at.positive_int, default=32)
    p.add_argument("--train-samples", type=at.positive_int, default=None,
                   help="samples per epoch (default: the training split of --data or --dataset)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="device optimizer (as export)")
    p.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy")
    p.add_argument("--threads", type=at.positive_int, default=1, help="threads for the timed steps (default 1)")
    p.add_argument("--reps", type=at.positive_int, default=5, help="timed repetitions per step (median)")
    p.add_argument("--attack", action="store_true", help="measure each cut's leakage: input reconstruction "
                   "(PSNR, SSIM) and, single split, label leakage from gradients (AUC); docs/privacy.md")
    p.add_argument("--attack-samples", type=at.positive_int, default=1000,
                   help="training samples the attacks use (half to train the decoder, half to score; default 1000)")
    p.add_argument("--out", type=at.writable_dir, default=Path("splitexport-plan"), help="where plan.json/png go")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("simulate", help="train a bundle split in process beside a monolithic run")
    p.add_argument("bundle", type=Path)
    _data_args(p)
    p.add_argument("--epochs", type=at.positive_int, default=3)
    p.add_argument("--batch-size", type=at.positive_int, default=32)
    p.add_argument("--seed", type=at.non_negative_int, default=0)
    p.add_argument("--device-runtime", choices=["torch", "onnx"], default="torch",
                   help="run device segments in torch or in ONNX Runtime training sessions")
    p.add_argument("--out", type=at.writable_dir, default=Path("splitexport-results"), help="where the plot and metrics go")
    p.add_argument("--no-progress", action="store_true")
    _optimizer_args(p, defaults=False)
    g = p.add_argument_group("multi-client split learning (docs/strategies.md); on with --clients or --strategy")
    g.add_argument("--clients", type=at.positive_int, default=None, help="number of simulated devices (default 2)")
    g.add_argument("--strategy", choices=list(STRATEGIES), default=None, help="multi-client strategy (default psl)")
    g.add_argument("--client-data", "--partition", dest="client_data", choices=["iid", "noniid"], default="iid",
                   help="client data: IID shuffle, or non-IID label shards (2 per client); --partition is a "
                   "deprecated alias")
    g.add_argument("--rounds", type=at.positive_int, default=_ROUNDS.default,
                   help="rounds (each client passes once over its data)")
    _strategy_args(g)
    g.add_argument("--server", type=at.http_url, default=None, metavar="URL",
                   help="run B on `splitexport serve --strategy` at URL (one HTTP session per device) instead of in "
                   "process; the strategy hyperparameters are the server's")
    g.add_argument("--token", default=None, help="bearer token for --server")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("export", help="export the device segments of a bundle for phones")
    p.add_argument("bundle", type=Path)
    p.add_argument("--format", choices=sorted(_EXPORTERS), required=True)
    p.add_argument("--ort-format", action="store_true", help="(onnx) also write .ort files for mobile builds")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="(onnx) device optimizer")
    p.add_argument("--lr", type=at.positive_float, default=None, help="device learning rate (default: the bundle's)")
    p.add_argument("--opset", type=int, default=None, help="(onnx) ONNX opset, 15..20 (default 17)")
    p.add_argument(
        "--batch-size", type=at.positive_int, default=None,
        help="(onnx) fix the batch size (default: dynamic); (tflite) batch size of the builtin variant (default 32)",
    )
    p.add_argument(
        "--tflite-variant", choices=["flex", "builtin", "both"], default="both",
        help="(tflite) flex: Select TF ops, dynamic batch; builtin: stock LiteRT, fixed batch (default: both)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="run the FastAPI server that trains the server segment")
    p.add_argument("bundle", type=Path)
    p.add_argument("--host", default=None, help="default 127.0.0.1; other addresses need --tokens")
    p.add_argument("--port", type=at.port, default=None, help="default 8000")
    p.add_argument("--state-dir", type=at.writable_dir, default=None,
                   help="B's snapshots, the step log and the sessions")
    p.add_argument("--tokens", type=at.existing_file, default=None, help="file of bearer tokens, one per line")
    p.add_argument("--checkpoint-every", type=at.positive_int, default=None,
                   help="snapshot B every N steps (default 100; with --strategy also at every round end); every "
                   "step is also logged, so a crash loses none")
    p.add_argument("--sync", choices=["full", "normal"], default=None,
                   help="state.db commits: full (default) fsyncs each step; normal survives a killed server, not a "
                   "power loss or OS crash (docs/protocol.md, Durability)")
    p.add_argument("--threads", type=at.positive_int, default=None, help="torch threads for B (default: one per core)")
    p.add_argument("--device", default=None, metavar="cpu|cuda[:N]", help="where B and its optimizer live "
                   "(default cpu)")
    p.add_argument("--replicas", type=at.positive_int, default=None, metavar="N",
                   help="run N replicas of B on this machine, rank r on --port + r (psl, sfl, sglr; docs/scaling.md)")
    p.add_argument("--distributed", action="store_true", help="run one rank of a torchrun job (RANK, WORLD_SIZE, "
                   "MASTER_ADDR, MASTER_PORT from the environment), on --port + LOCAL_RANK")
    p.add_argument("--collective-timeout", type=at.positive_float, default=None, metavar="S",
                   help="replicas: seconds a collective waits for the other ranks before answering 503 replica_lost "
                   "(default 2 x round timeout + 30)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"], default="warning")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let pages from ORIGIN (scheme://host[:port]) call the API; repeatable; none by default")
    p.add_argument("--app", action="store_true", help="serve the browser training page at /app/ and the operator "
                   "dashboard at /dashboard (needs device_runtime/js with its npm packages installed)")
    g = p.add_argument_group("multi-client strategy (docs/protocol.md); without --strategy devices train B "
                             "one after another")
    g.add_argument("--strategy", choices=list(STRATEGIES), default=None)
    g.add_argument("--clients", type=at.positive_int, default=None, help="C, the number of devices (required with --strategy)")
    g.add_argument("--round-timeout", type=at.positive_float, default=None,
                   help="seconds a barrier waits for missing devices before it goes on without them (default 30)")
    g.add_argument("--rounds", type=at.positive_int, default=None, help=f"{_ROUNDS.description} (default {_ROUNDS.default})")
    _strategy_args(g)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="copy what a phone app ships (device segments only)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--to", type=at.writable_dir, required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("demo", help="the whole path on the built-in default: partition, export, deploy, serve, "
                       "devices over HTTP vs monolithic")
    p.add_argument("--out", type=at.writable_dir, default=Path("splitexport-demo"), help="where every file goes")
    p.add_argument("--model", choices=["mlp", "resnet_cnn"], default="mlp", help="built-in example model (default mlp)")
    p.add_argument("--epochs", type=at.positive_int, default=6, help="epochs of digits")
    p.add_argument("--seed", type=at.non_negative_int, default=0)
    p.add_argument("--no-tfjs", action="store_true", help="skip the TF.js export even when TensorFlow is installed")
    p.add_argument("--no-progress", action="store_true", help="per-epoch lines only, no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def run(argv: Sequence[str]) -> None:
    """Run one command; errors propagate as :class:`SplitExportError`."""
    args = build_parser().parse_args(list(argv))
    args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except SplitExportError as exc:
        print(f"splitexport: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a file or folder the command needs: one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"splitexport: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("splitexport: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
