"""Datasets for prunet: an IDX reader and MNIST / Fashion-MNIST loading, splitting and batching."""

from prunet.data.datasets import (
    DATASETS,
    DatasetSplits,
    Split,
    batches,
    find_data_dir,
    load_dataset,
    num_batches,
)
from prunet.data.idx import DataError, read_idx, write_idx
from prunet.data.loading import first_batch, head, load_data, loader, loader_batches

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetSplits",
    "Split",
    "batches",
    "find_data_dir",
    "first_batch",
    "head",
    "load_data",
    "load_dataset",
    "loader",
    "loader_batches",
    "num_batches",
    "read_idx",
    "write_idx",
]
