"""The ``splitexport`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._errors import SplitExportError
from ._manifest import LossSpec, OptimizerSpec

if TYPE_CHECKING:
    from ._bundle import Bundle

EXIT_ERROR = 2


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
    p.add_argument("--arch", help="package.module:factory that builds the model (for a state dict)")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole nn.Module (runs code)")


def _optimizer_args(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    d = OptimizerSpec()
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=d.name if defaults else None)
    p.add_argument("--lr", type=float, default=d.lr if defaults else None)
    p.add_argument("--momentum", type=float, default=d.momentum if defaults else None)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay if defaults else None)


def _optimizer_from(args: argparse.Namespace, base: OptimizerSpec) -> OptimizerSpec:
    update = {
        k: v
        for k, v in {"name": args.optimizer, "lr": args.lr, "momentum": args.momentum,
                     "weight_decay": args.weight_decay}.items()
        if v is not None
    }
    try:
        return OptimizerSpec.model_validate({**base.model_dump(), **update})
    except ValueError as exc:
        raise SplitExportError(f"invalid optimizer settings: {exc}") from exc


def cmd_inspect(args: argparse.Namespace) -> None:
    from ._loading import load_model
    from ._partition import list_cut_points

    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    points = list_cut_points(loaded.module, torch.zeros(args.input_shape))
    print(f"{args.model} ({loaded.kind}), input {list(args.input_shape)}: {len(points)} valid cut points")
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

    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    part = partition(loaded.module, args.cut, torch.zeros(args.input_shape))
    bundle = write_bundle(
        part,
        args.output,
        source=SourceSpec(file_name=args.model.name, sha256=loaded.sha256, kind=loaded.kind, arch=loaded.arch),
        loss=LossSpec(kind=args.loss),
        optimizer=_optimizer_from(args, OptimizerSpec()),
        force=args.force,
    )
    print(f"wrote {bundle.path} ({part.split} split)")
    for seg in bundle.manifest.segments:
        print(f"  {seg.name} [{seg.role}] {seg.input.shape} -> {seg.output.shape}, {seg.parameters} params, "
              f"modules {', '.join(seg.modules)}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from ._bundle import load_bundle
    from ._simulate import simulate

    bundle = load_bundle(args.bundle)
    if args.clients is not None or args.strategy is not None:
        _simulate_clients(args, bundle)
        return
    simulate(
        bundle,
        dataset=args.dataset,
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
    from ._multiclient import simulate_clients, write_results

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
            bundle, strategy=strategy, clients=clients, partition=args.partition,
            rounds=args.rounds, batch_size=args.batch_size, seed=args.seed, dataset=args.dataset,
            optimizer=_optimizer_from(args, bundle.manifest.optimizer), alpha=args.alpha, phi=args.phi,
            phase_rounds=args.phase_rounds, kappa=args.kappa, eta=args.eta, lam=args.lam,
            link=link, progress=not args.no_progress, log=print,
        )
    finally:
        if link is not None:
            link.close()
    metrics, plot = write_results([result], args.out, title=f"{result.strategy}, {result.clients} clients, "
                                  f"{result.partition} on {args.dataset}")
    print(f"final test accuracy {result.final_accuracy:.4f}, traffic {result.total_bytes / 1e6:.2f} MB, "
          f"device FLOPs {result.device_flops:.3e}; wrote {plot} and {metrics}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the built-in default: ResNet-style CNN on digits, cut A|B|C, split vs monolithic."""
    from . import models

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model_path = out / "resnet_cnn.pt"
    torch.save(models.resnet_cnn().state_dict(), model_path)
    print(f"saved a fresh ResNet-style CNN state dict to {model_path}")
    common = ["--arch", "splitexport.models:resnet_cnn", "--input-shape", "1,1,8,8"]
    run(["inspect", str(model_path), *common])
    run(["partition", str(model_path), "--cut", "layer1", "--cut", "layer3", *common, "-o", str(out / "bundle"),
         "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "5e-4", "--force"])
    run(["simulate", str(out / "bundle"), "--dataset", "digits", "--epochs", str(args.epochs), "--out", str(out)])


_EXPORTERS: dict[str, tuple[str, str]] = {
    "onnx": ("splitexport.export._onnx", "run_export_onnx"),
    "tfjs": ("splitexport.export._tfjs", "run_export_tfjs"),
    "tflite": ("splitexport.export._tflite", "run_export_tflite"),
}


def cmd_export(args: argparse.Namespace) -> None:
    import importlib

    module_name, func = _EXPORTERS[args.format]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SplitExportError(
            f"the {args.format} exporter is not available in this installation ({exc}); "
            "install the extra it needs: pip install 'splitexport[onnx]' or 'splitexport[tf]'"
        ) from exc
    handler: Callable[[Path, argparse.Namespace], None] = getattr(module, func)
    handler(args.bundle, args)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from server import ServerSettings, create_app
    except ImportError as exc:
        raise SplitExportError(f"the server needs the 'server' extra: pip install 'splitexport[server]' ({exc})") from exc
    from ._bundle import load_bundle

    load_bundle(args.bundle)  # a clear error for a bad bundle before anything listens
    overrides = {k: v for k, v in {"bundle": args.bundle, "host": args.host, "port": args.port,
                                   "state_dir": args.state_dir, "tokens_file": args.tokens,
                                   "checkpoint_every": args.checkpoint_every, "threads": args.threads,
                                   "strategy": args.strategy,
                                   "num_clients": args.clients, "round_timeout_s": args.round_timeout,
                                   "alpha": args.alpha, "phi": args.phi, "phase_rounds": args.phase_rounds,
                                   "kappa": args.kappa, "eta": args.eta, "lam": args.lam,
                                   "total_rounds": args.rounds}.items() if v is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValueError as exc:
        raise SplitExportError(f"invalid server settings: {exc}") from exc
    try:
        app = create_app(settings)
    except ValueError as exc:
        raise SplitExportError(str(exc)) from exc
    # devices waiting for B or a barrier must not hold up a shutdown: their requests are cancelled after 3 s
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=3)


def cmd_deploy(args: argparse.Namespace) -> None:
    from ._bundle import deploy_bundle, load_bundle

    deployed = deploy_bundle(load_bundle(args.bundle), args.to, force=args.force)
    print(f"wrote {deployed.path}: {len(deployed.manifest.files)} device files "
          f"({', '.join(s.name for s in deployed.manifest.device_segments)})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitexport", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list every valid cut point of a model")
    _model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("partition", help="cut a model into a split bundle")
    _model_args(p)
    p.add_argument("--cut", action="append", required=True, help="cut after this layer (repeat: A|B|C)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    _optimizer_args(p, defaults=True)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("simulate", help="train a bundle split in process beside a monolithic run")
    p.add_argument("bundle", type=Path)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-runtime", choices=["torch", "onnx"], default="torch",
                   help="run device segments in torch or in ONNX Runtime training sessions")
    p.add_argument("--out", type=Path, default=Path("splitexport-results"), help="where the plot and metrics go")
    p.add_argument("--no-progress", action="store_true")
    _optimizer_args(p, defaults=False)
    g = p.add_argument_group("multi-client split learning (docs/strategies.md); on with --clients or --strategy")
    g.add_argument("--clients", type=int, default=None, help="number of simulated devices (default 2)")
    g.add_argument("--strategy", choices=["ssl", "psl", "sfl", "sglr", "adasplit", "fedavg"], default=None,
                   help="multi-client strategy (default psl)")
    g.add_argument("--partition", choices=["iid", "noniid"], default="iid",
                   help="client data: IID shuffle, or non-IID label shards (2 per client)")
    g.add_argument("--rounds", type=int, default=10, help="rounds (each client passes once over its data)")
    g.add_argument("--alpha", type=float, default=0.0, help="sglr SplitLr: server lr = lr * clients**alpha")
    g.add_argument("--phi", type=float, default=0.0, help="sglr SplitAvg: fraction of clients averaged")
    g.add_argument("--phase-rounds", type=int, default=None,
                   help="sglr phased SplitAvg: only the first k rounds (negative: the last |k|)")
    g.add_argument("--kappa", type=float, default=0.5, help="adasplit local-phase fraction of the rounds")
    g.add_argument("--eta", type=float, default=0.5, help="adasplit fraction of clients per iteration")
    g.add_argument("--lam", type=float, default=1e-4, help="adasplit L1 weight on the server masks")
    g.add_argument("--server", default=None, metavar="URL",
                   help="run B on `splitexport serve --strategy` at URL (one HTTP session per device) instead of in "
                   "process; the strategy hyperparameters are the server's")
    g.add_argument("--token", default=None, help="bearer token for --server")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("export", help="export the device segments of a bundle for phones")
    p.add_argument("bundle", type=Path)
    p.add_argument("--format", choices=sorted(_EXPORTERS), required=True)
    p.add_argument("--ort-format", action="store_true", help="(onnx) also write .ort files for mobile builds")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="(onnx) device optimizer")
    p.add_argument("--lr", type=float, default=None, help="device learning rate (default: the bundle's)")
    p.add_argument("--opset", type=int, default=None, help="(onnx) ONNX opset, 15..20 (default 17)")
    p.add_argument(
        "--batch-size", type=int, default=None,
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
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--state-dir", type=Path, default=None, help="B's snapshots, the step log and the sessions")
    p.add_argument("--tokens", type=Path, default=None, help="file of bearer tokens, one per line")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="snapshot B every N steps (default 100, with --strategy 1); without a strategy every step "
                   "is also logged, so a crash loses none")
    p.add_argument("--threads", type=int, default=None, help="torch threads for B (default: one per core)")
    p.add_argument("--log-level", default="warning")
    g = p.add_argument_group("multi-client strategy (docs/protocol.md); without --strategy devices train B "
                             "one after another")
    g.add_argument("--strategy", choices=["ssl", "psl", "sfl", "sglr", "adasplit", "fedavg"], default=None)
    g.add_argument("--clients", type=int, default=None, help="C, the number of devices (required with --strategy)")
    g.add_argument("--round-timeout", type=float, default=None,
                   help="seconds a barrier waits for missing devices before it goes on without them (default 30)")
    g.add_argument("--alpha", type=float, default=None, help="(sglr) server lr = client lr * C**alpha")
    g.add_argument("--phi", type=float, default=None, help="(sglr) fraction of devices sharing one averaged gradient")
    g.add_argument("--phase-rounds", type=int, default=None, help="(sglr) SplitAvg only in the first k (or last -k) "
                   "rounds")
    g.add_argument("--kappa", type=float, default=None, help="(adasplit) fraction of rounds in the local phase")
    g.add_argument("--eta", type=float, default=None, help="(adasplit) fraction of devices per iteration")
    g.add_argument("--lam", type=float, default=None, help="(adasplit) L1 weight of the server masks")
    g.add_argument("--rounds", type=int, default=None, help="total rounds (phased SplitAvg, AdaSplit phases)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="copy what a phone app ships (device segments only)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("demo", help="the main job on the built-in default model and dataset")
    p.add_argument("--out", type=Path, default=Path("splitexport-demo"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
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
    except KeyboardInterrupt:
        print("splitexport: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
