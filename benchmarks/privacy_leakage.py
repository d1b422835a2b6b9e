"""Leakage per cut on digits, as ``splitexport plan --attack`` measures it (the table in docs/privacy.md).

    python benchmarks/privacy_leakage.py [--samples 1000] [--train-epochs 20] [--smoke]

For the example MLP untrained and trained (SGD with momentum, --train-epochs on digits) and the example
ResNet-style CNN untrained: input reconstruction (PSNR, SSIM) and label leakage (cosine-attack AUC) at every
single cut, with the mean-image baseline. Defences (NoPeek, activation noise) are not implemented yet, so
there is no privacy/accuracy trade-off here.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from splitexport import load_dataset
from splitexport._partition import list_cut_points
from splitexport._privacy import measure, psnr, ssim
from splitexport.models import mlp, resnet_cnn


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="attack samples (half train the decoder)")
    p.add_argument("--train-epochs", type=int, default=20, help="epochs for the trained MLP")
    p.add_argument("--smoke", action="store_true", help="seconds: the MLP only, 200 samples, 5 decoder epochs")
    args = p.parse_args()
    data = load_dataset("digits")
    n = 200 if args.smoke else args.samples
    x, y = data.x_train[:n], data.y_train[:n]
    example = torch.zeros(1, 1, 8, 8)
    models: list[tuple[str, torch.nn.Module]] = []
    torch.manual_seed(0)
    models.append(("mlp, untrained", mlp()))
    if not args.smoke:
        torch.manual_seed(0)
        trained = train(mlp(), data.x_train, data.y_train, args.train_epochs)
        acc = float((trained(data.x_test).argmax(1) == data.y_test).float().mean())
        models.append((f"mlp, trained ({acc:.1%} test accuracy)", trained))
        torch.manual_seed(0)
        models.append(("resnet_cnn, untrained", resnet_cnn()))
    ref = x[n // 2:]
    mean = x[: n // 2].mean(0, keepdim=True).expand_as(ref)
    rng = float(x.max() - x.min())
    print(f"baseline (the mean training image): PSNR {psnr(mean, ref, rng):.1f} dB, SSIM {ssim(mean, ref, rng):.2f}")
    print("| model | cut | PSNR dB | SSIM | label AUC |\n|---|---|---|---|---|")
    for name, model in models:
        for point in list_cut_points(model, example):
            if point.params_before == 0 or point.params_after == 0:
                continue  # nothing to train on one side: plan skips these cuts too
            leak = measure(model, (point.name,), example, x, y, epochs=5 if args.smoke else 40)
            auc = "-" if leak.label_auc is None else f"{leak.label_auc:.3f}"
            print(f"| {name} | {point.name} | {leak.psnr_db:.1f} | {leak.ssim:.2f} | {auc} |")


if __name__ == "__main__":
    main()
