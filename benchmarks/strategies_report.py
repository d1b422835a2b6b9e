"""The multi-client strategies report: every strategy for several client counts on digits, IID and non-IID.

    python benchmarks/strategies_report.py            # ~9 min: docs/strategies-results.md, .json, docs/img/strategies-*.png
    python benchmarks/strategies_report.py --quick    # 2 and 5 clients, 3 rounds (~1 minute)
    python benchmarks/strategies_report.py --smoke    # seconds of CPU: checks the script runs (tests/benchmarks)

The model is the ResNet-style CNN (splitexport.models:resnet_cnn, seed 0) cut after ``layer1`` (A | B); a
double split (cut after layer1 and layer3, A | B | C) runs the strategies that support it at 5 clients.
Adam with lr 1e-3 and batch 16 for every segment, as in the SGLR paper's setup (it uses batch 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from splitexport import Bundle, Dataset, OptimizerSpec, SourceSpec, load_dataset, partition, write_bundle
from splitexport.models import resnet_cnn
from splitexport.plots import plot_multiclient, pyplot
from splitexport.simulation import MultiClientResult, c3_score, simulate_clients

ROOT = Path(__file__).resolve().parents[1]
ADAM = OptimizerSpec(name="adam", lr=1e-3)


@dataclass(frozen=True)
class Variant:
    label: str
    strategy: str
    options: tuple[tuple[str, float], ...] = ()


VARIANTS = [
    Variant("ssl", "ssl"),
    Variant("psl", "psl"),
    Variant("sfl", "sfl"),
    Variant("sglr a=0.5 phi=0.5", "sglr", (("alpha", 0.5), ("phi", 0.5))),
    Variant("adasplit k=0.6 eta=0.6", "adasplit", (("kappa", 0.6), ("eta", 0.6), ("lam", 1e-4))),
    Variant("fedavg", "fedavg"),
]
ABLATION = [  # SGLR's components alone (its Tables 1-2), IID only
    Variant("sglr SplitLr a=0.5", "sglr", (("alpha", 0.5),)),
    Variant("sglr SplitAvg phi=0.5", "sglr", (("phi", 0.5),)),
]
DOUBLE = [v for v in VARIANTS if v.strategy != "adasplit"]  # AdaSplit is single-split only


def _bundle(tmp: Path, cuts: list[str]) -> Bundle:
    torch.manual_seed(0)
    part = partition(resnet_cnn(), cuts, torch.zeros(2, 1, 8, 8))
    return write_bundle(part, tmp / "-".join(cuts), source=SourceSpec(file_name="resnet_cnn.pt", sha256="0" * 64,
                        kind="state_dict"), optimizer=ADAM)


def _run(bundle: Bundle, v: Variant, clients: int, part: str, rounds: int, seed: int = 0) -> MultiClientResult:
    t = time.time()
    res = simulate_clients(bundle, strategy=v.strategy, clients=clients, partition=part,  # type: ignore[arg-type]
                           rounds=rounds, batch_size=16, seed=seed, optimizer=ADAM, progress=False, dataset=DATA[0],
                           **dict(v.options))  # type: ignore[arg-type]
    res.label = v.label
    print(f"{v.label:>24} C={clients:<3} {part:<6} seed {seed} acc {res.final_accuracy:.4f}  {res.total_bytes / 1e6:8.2f} MB  "
          f"{time.time() - t:5.1f} s", flush=True)
    return res


DATA: list[str | Dataset] = ["digits"]
"""The dataset every run trains on (``--smoke``: a small slice of digits)."""

C3: dict[int, float] = {}
"""C3-Score per run (by id), filled by :func:`_table`."""


def _row(r: MultiClientResult, c3: float) -> str:
    best = max(m.test_accuracy for m in r.rounds)
    return (f"| {r.label} | {r.clients} | {r.partition} | {100 * r.final_accuracy:.1f} | {100 * best:.1f} | "
            f"{100 * r.final_local_accuracy:.1f} | "
            f"{r.total_bytes / 1e6:.2f} | {r.device_flops / 1e9:.2f} | {r.rounds[-1].server_flops / 1e9:.2f} | "
            f"{c3:.3f} |")


def _table(results: Sequence[MultiClientResult]) -> list[str]:
    """Rows with the C3-Score normalised within each (clients, partition, split) group, as AdaSplit does."""
    lines = [("| strategy | clients | partition | final acc % | best acc % | own-classes acc % | traffic MB | device GFLOP | "
             "server GFLOP | C3 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[int, str, str], list[MultiClientResult]] = {}
    for r in results:
        groups.setdefault((r.clients, r.partition, r.split), []).append(r)
    for group in groups.values():
        max_b = max(r.total_bytes for r in group)
        max_c = max(r.device_flops for r in group)
        for r in group:
            C3[id(r)] = c3_score(r.final_accuracy, r.total_bytes, r.device_flops, max_b, max_c)
            lines.append(_row(r, C3[id(r)]))
    return lines


def _summary_plot(results: Sequence[MultiClientResult], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, part in zip(axes, ("iid", "noniid"), strict=True):
        labels = dict.fromkeys(r.label for r in results if r.partition == part)
        for label in labels:
            rs = sorted((r for r in results if r.partition == part and r.label == label), key=lambda r: r.clients)
            ax.plot([r.clients for r in rs], [r.final_accuracy for r in rs], "-o", label=label, markersize=4)
        ax.set(xlabel="clients", title=f"final test accuracy, {part}", xscale="log")
        ticks = sorted({r.clients for r in results})
        ax.set_xticks(ticks, labels=[str(c) for c in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _checks(results: Sequence[MultiClientResult]) -> list[str]:
    """The papers' claims, measured: PSL vs SSL vs SGLR as clients grow; AdaSplit's bandwidth vs SL-basic."""
    def get(label: str, c: int, part: str) -> MultiClientResult | None:
        return next((r for r in results if r.label == label and r.clients == c and r.partition == part
                     and r.split == "single"), None)

    out = [("| partition | clients | SSL % | PSL % | PSL - SSL | SGLR % | SGLR - PSL | SplitLr only % | "
           "SplitAvg only % |"), "|---|---|---|---|---|---|---|---|---|"]
    for part in ("iid", "noniid"):
        for c in sorted({r.clients for r in results}):
            ssl, psl, sglr = get("ssl", c, part), get("psl", c, part), get("sglr a=0.5 phi=0.5", c, part)
            if not (ssl and psl and sglr):
                continue
            lr, avg = get("sglr SplitLr a=0.5", c, part), get("sglr SplitAvg phi=0.5", c, part)
            out.append(f"| {part} | {c} | {100 * ssl.final_accuracy:.1f} | {100 * psl.final_accuracy:.1f} | "
                       f"{100 * (psl.final_accuracy - ssl.final_accuracy):+.1f} | {100 * sglr.final_accuracy:.1f} | "
                       f"{100 * (sglr.final_accuracy - psl.final_accuracy):+.1f} | "
                       f"{f'{100 * lr.final_accuracy:.1f}' if lr else '-'} | "
                       f"{f'{100 * avg.final_accuracy:.1f}' if avg else '-'} |")
    out += ["", ("| partition | clients | SL-basic (ssl) % | AdaSplit % | AdaSplit traffic / SSL traffic | "
            "AdaSplit device FLOPs / SSL | own-classes ssl % | own-classes adasplit % | C3 ssl | C3 adasplit |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for part in ("iid", "noniid"):
        for c in sorted({r.clients for r in results}):
            ssl, ada = get("ssl", c, part), get("adasplit k=0.6 eta=0.6", c, part)
            if not (ssl and ada):
                continue
            out.append(f"| {part} | {c} | {100 * ssl.final_accuracy:.1f} | {100 * ada.final_accuracy:.1f} | "
                       f"{ada.total_bytes / ssl.total_bytes:.3f} | {ada.device_flops / ssl.device_flops:.2f} | "
                       f"{100 * ssl.final_local_accuracy:.1f} | {100 * ada.final_local_accuracy:.1f} | "
                       f"{C3[id(ssl)]:.3f} | {C3[id(ada)]:.3f} |")
    return out


SEED_CHECK = {  # (partition -> variant labels) re-run with seeds 1 and 2 at the two largest client counts
    "iid": ["ssl", "psl", "sglr a=0.5 phi=0.5", "sglr SplitLr a=0.5", "adasplit k=0.6 eta=0.6"],
    "noniid": ["ssl", "adasplit k=0.6 eta=0.6"],
}


def _seed_rows(single: Bundle, results: Sequence[MultiClientResult], clients: Sequence[int], rounds: int,
               seeds: Sequence[int]) -> list[str]:
    """Mean +- std of the final accuracy over seed 0 (the main table) and ``seeds`` (partition and batch order)."""
    by_label = {v.label: v for v in [*VARIANTS, *ABLATION]}
    lines = ["| partition | clients | strategy | final acc % (mean +- std) | own-classes acc % | runs |",
             "|---|---|---|---|---|---|"]
    for part, labels in SEED_CHECK.items():
        for c in clients:
            for label in labels:
                runs = [r for r in results if r.label == label and r.clients == c and r.partition == part]
                runs += [_run(single, by_label[label], c, part, rounds, seed=s) for s in seeds]
                acc = torch.tensor([100 * r.final_accuracy for r in runs])
                own = torch.tensor([100 * r.final_local_accuracy for r in runs])
                lines.append(f"| {part} | {c} | {label} | {acc.mean():.1f} +- {acc.std():.1f} | "
                             f"{own.mean():.1f} +- {own.std():.1f} | {len(runs)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--clients", type=int, nargs="+", default=[2, 5, 10, 20])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="2 and 5 clients, 3 rounds")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: 2 clients, 1 round, 64 train and 64 test images, into a temporary folder unless --out")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.rounds = [2, 5], 3
    seeds: tuple[int, ...] = (1, 2)
    if args.smoke:
        args.clients, args.rounds, seeds = [2], 1, (1,)
        digits = load_dataset("digits")
        DATA[0] = dataclasses.replace(digits, x_train=digits.x_train[:64], y_train=digits.y_train[:64],
                                      x_test=digits.x_test[:64], y_test=digits.y_test[:64])
        if "--out" not in (argv if argv is not None else sys.argv[1:]):
            args.out = Path(tempfile.mkdtemp(prefix="strategies-smoke-"))
    torch.set_num_threads(1)
    start = time.time()
    out: Path = args.out
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    results: list[MultiClientResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        single = _bundle(Path(tmp), ["layer1"])
        double = _bundle(Path(tmp), ["layer1", "layer3"])
        for part in ("iid", "noniid"):
            for c in args.clients:
                group = [_run(single, v, c, part, args.rounds) for v in VARIANTS]
                if part == "iid":
                    group += [_run(single, v, c, part, args.rounds) for v in ABLATION]
                results += group
                plot_multiclient(group, img / f"strategies-{part}-{c}.png",
                                 title=f"ResNet CNN A|B on digits, {c} clients, {part}")
        mid = 5 if 5 in args.clients else args.clients[0]
        doubles = [_run(double, v, mid, "iid", args.rounds) for v in DOUBLE]
        seed_rows = _seed_rows(single, results, sorted(args.clients)[-2:], args.rounds, seeds=seeds)
        plot_multiclient(doubles, img / "strategies-double.png", title=f"ResNet CNN A|B|C on digits, {mid} clients, iid")
    _summary_plot(results, img / "strategies-summary.png")
    lines = [
        "# Multi-client strategies: measured results",
        "",
        (f"Generated by `python benchmarks/strategies_report.py` in {time.time() - start:.0f} s "
        f"(torch {torch.__version__}, 1 thread). Discussion: [strategies.md](strategies.md)."),
        "",
        (f"Setup: ResNet-style CNN on scikit-learn digits (1347 train / 450 test), {args.rounds} rounds (a round is "
        "one pass of every client over its partition), batch 16, Adam lr 1e-3 on every segment, seed 0, one run per "
        "cell. Accuracy is the mean over clients of each client's model on the whole test split. Traffic counts "
        "float32 activations/gradients/weights and int64 labels, up plus down, a SplitAvg broadcast once. FLOPs are "
        "3x forward FLOPs per trained sample. C3-Score uses T = 8 with B_max, C_max the largest traffic and device "
        "compute within each (clients, partition) group."),
        "",
        "## Single split (A | B), all strategies",
        "",
        *_table(results),
        "",
        "## The papers' claims on our data",
        "",
        *_checks(results),
        "",
        "## Seed check",
        "",
        ("The largest two client counts again with seeds 1 and 2 (seed = client partition, batch order, SplitAvg "
        "sampling, UCB tie order; the initial weights are the bundle's), beside seed 0 from the table above."),
        "",
        *seed_rows,
        "",
        f"## Double split (A | B | C), {mid} clients, IID",
        "",
        *_table(doubles),
        "",
        "## Plots",
        "",
        "![final accuracy vs clients](img/strategies-summary.png)",
        "",
        *[f"![{part} {c} clients](img/strategies-{part}-{c}.png)" for part in ("iid", "noniid") for c in args.clients],
        "",
        "![double split](img/strategies-double.png)",
        "",
    ]
    (out / "strategies-results.md").write_text("\n".join(lines))
    (out / "strategies-results.json").write_text(json.dumps(
        [{**r.to_dict(), "c3_score": C3[id(r)]} for r in [*results, *doubles]], indent=1))
    print(f"wrote {out / 'strategies-results.md'} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
