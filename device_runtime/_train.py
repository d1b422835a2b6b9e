"""``python -m device_runtime train``: a device training A and C against a running server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from splitexport import (
    Bundle,
    SegmentRunner,
    SplitExportError,
    SplitModel,
    TorchSegment,
    fit,
    load_bundle,
)
from splitexport import argtypes as at
from splitexport.data import resolve_data
from splitexport.plots import plot_histories

from ._client import RemoteSegment, ServerClient, ServerError


def device_runner(bundle: Bundle, name: str, runtime: str) -> SegmentRunner:
    """A device segment in ONNX Runtime or TFLite (the phone's runtimes) or torch (reference).

    ONNX Runtime and TFLite train with the optimizer and learning rate their artifacts were exported with, as a
    phone does (``export --optimizer sgd`` of a momentum bundle: plain SGD on the device).
    """
    spec = bundle.segment(name)
    if runtime == "onnx":
        from ._ort_runner import OrtRunner

        return OrtRunner.from_bundle(bundle, name)
    if runtime == "tflite":
        from ._tflite_runner import TfliteRunner

        return TfliteRunner.from_bundle(bundle, name)
    from splitexport.defence import defence_for

    return TorchSegment(bundle.torch_segment(name), bundle.manifest.optimizer, loss=bundle.manifest.loss.kind,
                        input_grad=spec.index > 0, defence=defence_for(bundle.manifest.defence, spec.index))


def build_split_model(bundle: Bundle, client: ServerClient, runtime: str, session_id: str | None = None,
                      fp16: bool = False) -> tuple[SplitModel, RemoteSegment]:
    """The split model with B on the server; the device segments load first (a bad bundle fails before any call)."""
    device = {s.name: device_runner(bundle, s.name, runtime) for s in bundle.manifest.device_segments}
    remote = RemoteSegment(client, session_id, fp16=fp16)
    runners = [device.get(spec.name, remote) for spec in bundle.manifest.segments]
    return SplitModel(runners), remote


def main(argv: list[str] | None = None) -> int:
    p = at.OneLineParser(prog="python -m device_runtime", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the device segments against a server")
    t.add_argument("--server", type=at.http_url, required=True, metavar="URL")
    t.add_argument("--bundle", type=Path, required=True, help="deployed bundle (splitexport deploy)")
    t.add_argument("--token", default=None,
                   help="bearer token (default: $SPLITEXPORT_TOKEN; a token on the command line shows in process lists)")
    t.add_argument("--runtime", choices=["onnx", "tflite", "torch"], default="onnx",
                   help="tflite: the flex variant if exported (any batch), else builtin (batches of its size)")
    t.add_argument("--dataset", default="digits", help="built-in dataset when no --data")
    t.add_argument("--data", default=None, metavar="PATH",
                   help="the device's own data: .npz/.npy, .csv (with --target) or an image folder, preprocessed "
                   "as the bundle's manifest records (docs/bundle.md)")
    t.add_argument("--target", default=None, metavar="COLUMN", help="the label column of a --data CSV")
    t.add_argument("--epochs", type=at.positive_int, default=5)
    t.add_argument("--batch-size", type=at.positive_int, default=32)
    t.add_argument("--seed", type=at.non_negative_int, default=0)
    t.add_argument("--fp16", action="store_true", help="send activations and gradients as float16")
    t.add_argument("--out", type=at.writable_dir, default=Path("device-results"))
    t.add_argument("--no-progress", action="store_true", help="no progress bar (per-epoch lines only)")
    args = p.parse_args(argv)
    try:
        return _train(args)
    except (SplitExportError, ServerError) as exc:
        print(f"device_runtime: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder it needs
        print(f"device_runtime: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}",
              file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    data = resolve_data(args.dataset, bundle.manifest, data=args.data, target=args.target)
    client = ServerClient(args.server, args.token if args.token is not None else os.environ.get("SPLITEXPORT_TOKEN"))
    torch.manual_seed(args.seed)
    model, remote = build_split_model(bundle, client, args.runtime, fp16=args.fp16)
    if args.runtime == "onnx":
        print(f"device optimizer (ONNX artifacts): {bundle.manifest.exports['onnx']['optimizer']}")
    print(f"session {remote.session_id} at step {remote.step}")
    history = fit(model, data, name=f"split over HTTP ({args.runtime})", epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, loss=bundle.manifest.loss.kind,
                  progress=not args.no_progress,
                  on_epoch=lambda e: tqdm.write(f"epoch {e.epoch}: train loss {e.train_loss:.4f} "
                                                f"test acc {e.test_accuracy:.4f}"))
    args.out.mkdir(parents=True, exist_ok=True)
    plot_histories([history], args.out / "device_training.png", title=f"device training against {args.server}")
    (args.out / "metrics.json").write_text(json.dumps({**history.to_dict(), "retries": client.retries}, indent=2))
    last = history.epochs[-1]
    score = f"test MSE {last.test_loss:.4f}" if bundle.manifest.loss.kind == "mse" else \
        f"test accuracy {last.test_accuracy:.4f}"
    print(f"final {score}; wrote {args.out}/device_training.png")
    return 0
