"""PNG plots of training curves (matplotlib, the ``sim`` extra, imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import SplitExportError
from .._trainer import History


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; without matplotlib, one line naming the extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SplitExportError("plots need matplotlib: pip install 'splitexport[sim]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histories(histories: Sequence[History], path: str | Path, title: str = "") -> Path:
    """Loss and test accuracy per epoch for each run, side by side, written as a PNG."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    styles = ["-o", "--s", ":^", "-.d", "-x"]
    for i, h in enumerate(histories):
        epochs = [e.epoch for e in h.epochs]
        style = styles[i % len(styles)]
        ax_loss.plot(epochs, [e.train_loss for e in h.epochs], style, label=f"{h.name} train", alpha=0.85)
        ax_loss.plot(epochs, [e.test_loss for e in h.epochs], style, label=f"{h.name} test", alpha=0.5)
        ax_acc.plot(epochs, [e.test_accuracy for e in h.epochs], style, label=h.name, alpha=0.85)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    return _save(fig, (ax_loss, ax_acc), path, title, legend_size=8)


def plot_multiclient(results: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """Test accuracy per round and against cumulative bandwidth (MB), one line per run."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-o", "--s", ":^", "-.d", "-x", "--v", ":P"]
    for i, res in enumerate(results):
        label = res.label or f"{res.strategy} (C={res.clients})"
        acc = [m.test_accuracy for m in res.rounds]
        style = styles[i % len(styles)]
        ax_r.plot([m.round for m in res.rounds], acc, style, label=label, alpha=0.85, markersize=3)
        ax_b.plot([m.bytes / 1e6 for m in res.rounds], acc, style, label=label, alpha=0.85, markersize=3)
    ax_r.set(xlabel="round", ylabel="test accuracy", title="accuracy vs rounds")
    ax_b.set(xlabel="cumulative traffic (MB)", ylabel="test accuracy", title="accuracy vs bandwidth")
    ax_b.set_xscale("symlog", linthresh=0.1)
    return _save(fig, (ax_r, ax_b), path, title, legend_size=7)


def _save(fig: Any, axes: Sequence[Any], path: Path, title: str, legend_size: int) -> Path:
    """Grid and legend on every axis, the title, then write the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
