"""Datasets for the harness and the device runtime: the bundled digits, a user's own files (``.npz``/``.npy``,
CSV, image folders) checked against a bundle and preprocessed as its manifest records.

The public home of :mod:`splitexport.simulation.data` and :mod:`splitexport.simulation.datafiles`.
"""

from .simulation.data import DATASETS, Dataset, batch_indices, load_dataset
from .simulation.datafiles import load_data, preprocess_for, read_data, resolve_data

__all__ = ["DATASETS", "Dataset", "batch_indices", "load_data", "load_dataset", "preprocess_for", "read_data",
           "resolve_data"]
