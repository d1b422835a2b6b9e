"""PNG plots of training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._trainer import History


def plot_histories(histories: Sequence[History], path: str | Path, title: str = "") -> Path:
    """Loss and test accuracy per epoch for each run, side by side, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
