"""Datasets: IDX readers, local directories for everyone, download where there is a network."""

from __future__ import annotations

from lrdeploy.data.datasets import (
    DATASETS,
    ArrayDataset,
    DatasetSpec,
    FileSpec,
    default_cache_dir,
    find_dataset_dir,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    resolve_dataset_dir,
)
from lrdeploy.data.download import download_dataset
from lrdeploy.data.idx import parse_idx, read_idx

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetSpec",
    "FileSpec",
    "default_cache_dir",
    "download_dataset",
    "find_dataset_dir",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "resolve_dataset_dir",
]
