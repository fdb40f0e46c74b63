"""Datasets: IDX and CIFAR-10 readers, local directories for everyone, download where there is a network."""

from __future__ import annotations

from lrdeploy.data.datasets import (
    DATASETS,
    READERS,
    ArrayDataset,
    DatasetSpec,
    FileSpec,
    ReaderSpec,
    dataset_names,
    default_cache_dir,
    find_dataset_dir,
    get_dataset_spec,
    get_reader,
    list_datasets,
    load_dataset,
    register_reader,
    resolve_dataset_dir,
)
from lrdeploy.data.download import download_dataset

# Importing a reader module registers its dataset (after datasets/download, which it builds on).
from lrdeploy.data.cifar10 import download_cifar10, load_cifar10  # noqa: E402  isort: skip
from lrdeploy.data.idx import parse_idx, read_idx
from lrdeploy.data.multi30k import TranslationDataset, download_translation, load_translation
from lrdeploy.data.tokenizer import WordTokenizer

__all__ = [
    "DATASETS",
    "READERS",
    "ArrayDataset",
    "DatasetSpec",
    "FileSpec",
    "ReaderSpec",
    "TranslationDataset",
    "WordTokenizer",
    "dataset_names",
    "default_cache_dir",
    "download_cifar10",
    "download_dataset",
    "download_translation",
    "find_dataset_dir",
    "get_dataset_spec",
    "get_reader",
    "list_datasets",
    "load_cifar10",
    "load_dataset",
    "load_translation",
    "parse_idx",
    "read_idx",
    "register_reader",
    "resolve_dataset_dir",
]
