"""PNG figures of training curves (needs matplotlib: the ``sim`` extra).

The public home of ``simulation.plots`` (the code lives there; matplotlib is imported only when a figure is drawn).
"""

from .simulation.plots import plot_histories, plot_multiclient, pyplot

__all__ = ["plot_histories", "plot_multiclient", "pyplot"]
