"""Leakage per cut on digits, and the privacy/accuracy trade-off of the defences (the tables in docs/privacy.md).

    python benchmarks/privacy_leakage.py [--samples 1000] [--train-epochs 20] [--plot docs/img/privacy-tradeoff.png]
    python benchmarks/privacy_leakage.py --smoke      # seconds: a few settings on 200 samples

Part 1: for the example MLP untrained and trained (SGD with momentum, --train-epochs on digits) and the example
ResNet-style CNN untrained: input reconstruction (PSNR, SSIM) and label leakage (cosine-attack AUC) at every
single cut, with the mean-image baseline (the attacks of ``plan --attack``).

Part 2: the MLP trained with each defence setting (NoPeek weight W, activation-noise std S) at two cuts: test
accuracy after training, and the leakage of the trained A (the server's attacks on what it receives, the noise
included; dCor(x, A(x)) on the attack samples). The defended model is trained as the monolithic model with the
defence's terms, which equals the split training bit for bit or to float32 rounding
(tests/splitexport/test_defence.py).

Part 3 (``--parts tokens``): token recovery at every cut of the small transformer of tests/zoo.py (untrained,
token ids from its text task), with the per-position majority baseline.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from splitexport import Dataset, MonolithicModel, OptimizerSpec, fit, load_dataset, named_state, partition
from splitexport._manifest import DefenceSpec
from splitexport._partition import list_cut_points
from splitexport._privacy import measure, psnr, ssim
from splitexport.defence import Defence, distance_correlation
from splitexport.models import mlp, resnet_cnn

EXAMPLE = torch.zeros(1, 1, 8, 8)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def cut_table(data: Dataset, x: torch.Tensor, y: torch.Tensor, *, smoke: bool, train_epochs: int) -> None:
    models: list[tuple[str, torch.nn.Module]] = []
    torch.manual_seed(0)
    models.append(("mlp, untrained", mlp()))
    if not smoke:
        torch.manual_seed(0)
        trained = train(mlp(), data.x_train, data.y_train, train_epochs)
        acc = float((trained(data.x_test).argmax(1) == data.y_test).float().mean())
        models.append((f"mlp, trained ({acc:.1%} test accuracy)", trained))
        torch.manual_seed(0)
        models.append(("resnet_cnn, untrained", resnet_cnn()))
    print("| model | cut | PSNR dB | SSIM | label AUC |\n|---|---|---|---|---|")
    for name, model in models:
        for point in list_cut_points(model, EXAMPLE):
            if point.params_before == 0 or point.params_after == 0:
                continue  # nothing to train on one side: plan skips these cuts too
            leak = measure(model, (point.name,), EXAMPLE, x, y, epochs=5 if smoke else 40)
            auc = "-" if leak.label_auc is None else f"{leak.label_auc:.3f}"
            print(f"| {name} | {point.name} | {leak.psnr_db:.1f} | {leak.ssim:.2f} | {auc} |")


def tradeoff(data: Dataset, x: torch.Tensor, y: torch.Tensor, *, cuts: list[str], settings: list[DefenceSpec],
             epochs: int, decoder_epochs: int) -> list[dict[str, object]]:
    """Train the MLP with each defence at each cut (monolithic with the defence's terms == split); measure."""
    rows: list[dict[str, object]] = []
    print("\n| cut | defence | test acc | PSNR dB | SSIM | label AUC | dCor(x, A(x)) |\n|---|---|---|---|---|---|---|")
    opt = OptimizerSpec(name="sgd", lr=0.1, momentum=0.9)
    for cut in cuts:
        for spec in settings:
            torch.manual_seed(0)
            part = partition(mlp(), [cut], EXAMPLE)
            seq = torch.nn.Sequential(*[copy.deepcopy(s.module) for s in part.segments])
            model = MonolithicModel(seq, opt, defence=Defence(spec, seed=0) if spec.active else None)
            hist = fit(model, data, name=cut, epochs=epochs, batch_size=32, seed=0, progress=False)
            acc = hist.epochs[-1].test_accuracy
            label = ("none" if not spec.active else ", ".join(
                f"{k} {v:g}" for k, v in (("nopeek", spec.nopeek), ("noise", spec.activation_noise)) if v))
            if not all(bool(torch.isfinite(t).all()) for t in named_state(list(seq)).values()):
                print(f"| {cut} | {label} | diverged: non-finite weights | | | | |", flush=True)
                continue
            whole = mlp()
            whole.load_state_dict(named_state(list(seq)))
            leak = measure(whole.eval(), (cut,), EXAMPLE, x, y, epochs=decoder_epochs, noise=spec.activation_noise)
            with torch.no_grad():
                dcor = float(distance_correlation(x, seq[0].eval()(x)))
            rows.append({"cut": cut, "defence": label, "nopeek": spec.nopeek, "noise": spec.activation_noise,
                         "accuracy": acc, "psnr_db": leak.psnr_db, "ssim": leak.ssim, "label_auc": leak.label_auc,
                         "dcor": dcor})
            print(f"| {cut} | {label} | {acc:.3f} | {leak.psnr_db:.1f} | {leak.ssim:.2f} | "
                  f"{leak.label_auc:.3f} | {dcor:.3f} |", flush=True)
    return rows


def token_table(samples: int, decoder_epochs: int) -> None:
    from tests.zoo import _text, transformer

    torch.manual_seed(0)
    model, (ids, y) = transformer(), _text(samples, 0)
    example = torch.zeros(1, 16, dtype=torch.long)
    print("\n| model | cut | token accuracy | majority baseline | label AUC |\n|---|---|---|---|---|")
    for point in list_cut_points(model, example):
        if point.params_before == 0 or point.params_after == 0:
            continue
        leak = measure(model, (point.name,), example, ids, y, epochs=decoder_epochs)
        print(f"| transformer (tests/zoo), untrained | {point.name} | {leak.token_accuracy:.3f} | "
              f"{leak.token_baseline:.3f} | {leak.label_auc:.3f} |", flush=True)


def plot(rows: list[dict[str, object]], baseline_ssim: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"nopeek": "o", "noise": "^"}
    for cut, color in zip(sorted({str(r["cut"]) for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
        for kind, marker in markers.items():
            pts = [r for r in rows if r["cut"] == cut and (r[kind] or r["defence"] == "none")]
            pts.sort(key=lambda r: float(r[kind]))  # type: ignore[arg-type]
            ax.plot([float(r["ssim"]) for r in pts], [float(r["accuracy"]) for r in pts],  # type: ignore[arg-type]
                    marker=marker, color=color, linestyle="-" if kind == "nopeek" else "--",
                    label=f"cut {cut}, {'NoPeek W' if kind == 'nopeek' else 'noise S'}")
            for r in pts:
                if r[kind]:
                    ax.annotate(f"{float(r[kind]):g}", (float(r["ssim"]), float(r["accuracy"])),  # type: ignore[arg-type]
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(baseline_ssim, color="grey", linestyle=":", label="mean-image SSIM (no leak)")
    ax.set_xlabel("SSIM of the server's reconstruction (lower: less leakage)")
    ax.set_ylabel("test accuracy")
    ax.set_title("MLP on digits: privacy vs accuracy of NoPeek and activation noise", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="attack samples (half train the decoder)")
    p.add_argument("--train-epochs", type=int, default=20, help="epochs of every trained MLP")
    p.add_argument("--plot", type=Path, default=None, help="write the trade-off plot (PNG) here")
    p.add_argument("--parts", default="cuts,tradeoff,tokens", help="comma-separated parts to run (default all)")
    p.add_argument("--smoke", action="store_true", help="seconds: the untrained MLP's cuts and two defences at one "
                   "cut, 200 samples, 1 training epoch, 5 decoder epochs")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and far faster on a loaded machine)
    start = time.perf_counter()
    data = load_dataset("digits")
    n = 200 if args.smoke else args.samples
    x, y = data.x_train[:n], data.y_train[:n]
    ref = x[n // 2:]
    mean = x[: n // 2].mean(0, keepdim=True).expand_as(ref)
    rng = float(x.max() - x.min())
    base_ssim = ssim(mean, ref, rng)
    print(f"baseline (the mean training image): PSNR {psnr(mean, ref, rng):.1f} dB, SSIM {base_ssim:.2f}")
    parts = set(args.parts.split(","))
    if "cuts" in parts:
        cut_table(data, x, y, smoke=args.smoke, train_epochs=args.train_epochs)
    if "tokens" in parts:
        token_table(200 if args.smoke else args.samples, 5 if args.smoke else 40)
    if "tradeoff" not in parts:
        rows = []
    elif args.smoke:
        small = Dataset("digits-200", data.x_train[:200], data.y_train[:200], data.x_test, data.y_test, 10)
        rows = tradeoff(small, x, y, cuts=["relu1"], settings=[DefenceSpec(nopeek=1.0), DefenceSpec(activation_noise=0.5)],
                        epochs=1, decoder_epochs=5)
    else:
        settings = [DefenceSpec(), *(DefenceSpec(nopeek=w) for w in (0.5, 1.0, 2.0, 4.0)),
                    *(DefenceSpec(activation_noise=s) for s in (0.5, 1.0, 2.0, 4.0))]
        rows = tradeoff(data, x, y, cuts=["fc1", "relu2"], settings=settings, epochs=args.train_epochs,
                        decoder_epochs=40)
    if args.plot is not None and rows:
        plot(rows, base_ssim, args.plot)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
