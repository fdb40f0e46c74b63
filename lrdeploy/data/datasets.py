"""The datasets lrdeploy knows, where their files are found, and loading them as normalised tensors.

Where files come from, in order:

1. ``data_dir`` (``--data-dir``), else the ``LRDEPLOY_DATA`` environment variable — when either is given it
   is the only place looked at, so a typo is reported rather than silently replaced by other data;
2. otherwise the user cache (``$XDG_CACHE_HOME/lrdeploy/datasets``, default ``~/.cache/lrdeploy/datasets``,
   where ``--download`` puts files), then the MNIST copy shipped inside the package.

A data directory may be the root that holds ``mnist/``, ``fashion-mnist/`` … or a dataset folder itself;
torchvision's layout (``MNIST/raw``, ``FashionMNIST/raw``) is accepted too. Each file may be ``.gz`` or
already extracted. Every file is verified against the sha256 of its decompressed content (see
:mod:`lrdeploy.data.checksum` for why the content and not the ``.gz`` stream).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrdeploy.data.checksum import read_verified
from lrdeploy.data.idx import parse_idx
from lrdeploy.download_scope import download_wanted, downloads_allowed  # noqa: F401  (re-exported)
from lrdeploy.errors import UserError

SPLITS = ("train", "test")
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class FileSpec:
    """One IDX file: its canonical (mirror) name, and the size and sha256 of its decompressed content."""

    filename: str
    sha256: str
    size: int

    @property
    def raw_name(self) -> str:
        """The name once extracted (torchvision keeps both forms side by side)."""
        return self.filename.removesuffix(".gz")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    folder: str
    files: Mapping[str, tuple[FileSpec, FileSpec]]  # split -> (images, labels)
    counts: Mapping[str, int]
    mirrors: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int] = (1, 28, 28)
    alt_folders: tuple[str, ...] = ()
    builtin: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocess(self) -> dict:
        """What a deployment must do to raw uint8 pixels: ``(x * scale - mean) / std`` per channel."""
        return {"scale": 1.0 / 255.0, "mean": list(self.mean), "std": list(self.std)}

    def all_files(self) -> list[FileSpec]:
        return [f for split in SPLITS for f in self.files[split]]


def _idx_files(train_img: str, train_lbl: str, test_img: str, test_lbl: str) -> dict:
    return {
        "train": (
            FileSpec("train-images-idx3-ubyte.gz", train_img, 16 + 60000 * 28 * 28),
            FileSpec("train-labels-idx1-ubyte.gz", train_lbl, 8 + 60000),
        ),
        "test": (
            FileSpec("t10k-images-idx3-ubyte.gz", test_img, 16 + 10000 * 28 * 28),
            FileSpec("t10k-labels-idx1-ubyte.gz", test_lbl, 8 + 10000),
        ),
    }


# Content digests computed from the decompressed official files. For MNIST their md5s equal the official
# decompressed md5s (6bbc9ace…, a25bea73…, 2646ac64…, 27ae3e4e…); the .gz files on torchvision's mirror are
# byte-identical to the package's copies. Fashion-MNIST's were computed from Debian's dataset-fashion-mnist
# files, whose gzip streams differ from upstream's but decompress to the same dataset.
# mean/std: population statistics of the training images scaled to [0, 1] (recomputed in the tests).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist",
            title="MNIST",
            folder="mnist",
            files=_idx_files(
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
            counts={"train": 60000, "test": 10000},
            mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
            mean=(0.1307,),
            std=(0.3081,),
            classes=tuple(str(d) for d in range(10)),
            alt_folders=("MNIST/raw",),
            builtin=True,
        ),
        DatasetSpec(
            name="fashion-mnist",
            title="Fashion-MNIST",
            folder="fashion-mnist",
            files=_idx_files(
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
            counts={"train": 60000, "test": 10000},
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            mean=(0.2860,),
            std=(0.3530,),
            classes=(
                "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
            ),
            alt_folders=("FashionMNIST/raw",),
        ),
    )
}


def _known_digests() -> dict[str, str]:
    """Content digest -> human description, to tell a user which file they actually have."""
    names = {"train": ("train images", "train labels"), "test": ("test images", "test labels")}
    return {
        f.sha256: f"{spec.title} {desc}"
        for spec in DATASETS.values()
        for split in SPLITS
        for f, desc in zip(spec.files[split], names[split], strict=True)
    }


@dataclass(frozen=True)
class ReaderSpec:
    """A dataset in its own file format (CIFAR-10 …), registered by the module that reads it.

    IDX datasets are plain data (:class:`DatasetSpec`); other formats bring their own ``load(split, data_dir,
    limit, download) -> ArrayDataset`` and ``download(dest, mirrors=None, timeout=60.0) -> Path``, and
    :func:`load_dataset` / ``download_dataset`` dispatch to them by name.
    """

    name: str
    title: str
    load: Callable[..., ArrayDataset]
    download: Callable[..., Path]
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    aliases: tuple[str, ...] = ()


READERS: dict[str, ReaderSpec] = {}


def _dataset_key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_reader(spec: ReaderSpec) -> ReaderSpec:
    for key in (spec.name, *spec.aliases):
        if key in READERS or key in DATASETS:
            raise ValueError(f"dataset '{key}' is already registered")
        READERS[key] = spec
    return spec


def get_reader(name: str) -> ReaderSpec | None:
    """The registered reader for ``name`` (aliases accepted), or None for IDX datasets and unknown names."""
    return READERS.get(_dataset_key(name))


def list_datasets() -> list[DatasetSpec]:
    return list(DATASETS.values())


def dataset_names() -> list[str]:
    """Every dataset name ``load_dataset`` accepts (IDX ones and registered readers, without aliases)."""
    return [*DATASETS, *dict.fromkeys(r.name for r in READERS.values())]


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name (case-insensitive, ``_`` accepted for ``-``)."""
    key = _dataset_key(name)
    if key in DATASETS:
        return DATASETS[key]
    if key in READERS:
        raise UserError(f"dataset '{name}' is not in IDX format", hint="load it with load_dataset")
    close = difflib.get_close_matches(key, [*DATASETS, *READERS], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown dataset '{name}'", hint=f"{hint}known datasets: {', '.join(dataset_names())}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lrdeploy" / "datasets"


def _locate(folder: Path, f: FileSpec) -> Path | None:
    for candidate in (folder / f.filename, folder / f.raw_name):
        if candidate.is_file():
            return candidate
    return None


def _candidates(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / spec.folder, *(root / alt for alt in spec.alt_folders), root]


def find_dataset_dir(
    spec: DatasetSpec, root: str | os.PathLike, splits: tuple[str, ...] = SPLITS
) -> Path | None:
    """The folder under ``root`` (or ``root`` itself) that holds every file of ``splits``, if any."""
    root = Path(root).expanduser()
    for folder in _candidates(spec, root):
        if all(_locate(folder, f) for split in splits for f in spec.files[split]):
            return folder
    return None


def _missing_error(spec: DatasetSpec, roots: list[Path], split: str) -> UserError:
    names = ", ".join(f.filename for f in spec.files[split])
    looked = []
    for root in roots:
        if root.is_dir():
            looked += [str(c) for c in _candidates(spec, root) if c.is_dir()]
        else:
            looked.append(f"{root} ({where_not(root)})")
    return UserError(
        f"{spec.title} {split} files not found in {', '.join(looked)}: expected {names} (.gz or extracted)",
        hint=f"pass --data-dir DIR (a folder holding {spec.folder}/ or the files themselves) or set "
        "LRDEPLOY_DATA, or add --download where there is a network",
    )


def where_not(root: Path) -> str:
    """Why ``root`` (not a directory) was not looked in: a file is not "missing"."""
    if root.exists():
        return "a file, not a directory"
    return "a broken symbolic link" if root.is_symlink() else "does not exist"


def resolve_dataset_dir(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """The folder holding ``name``'s ``split`` files, following the order in the module docstring."""
    spec = get_dataset_spec(name)
    download = download_wanted(download)
    explicit = data_dir if data_dir is not None else os.environ.get("LRDEPLOY_DATA") or None
    if explicit is not None:
        root = Path(explicit).expanduser()
        found = find_dataset_dir(spec, root, (split,))
        if found is None and download:
            from lrdeploy.data.download import download_dataset

            return download_dataset(spec.name, root)
        if found is None:
            raise _missing_error(spec, [root], split)
        return found
    cache = default_cache_dir()
    found = find_dataset_dir(spec, cache, (split,))
    if found is None and spec.builtin:
        found = find_dataset_dir(spec, BUILTIN_DIR, (split,))
    if found is None and download:
        from lrdeploy.data.download import download_dataset

        return download_dataset(spec.name, cache)
    if found is None:
        raise _missing_error(spec, [cache], split)
    return found


@dataclass
class ArrayDataset:
    """A whole split in memory: ``x`` float32 N×C×H×W already normalised, ``y`` int64 N.

    MNIST-sized data fits comfortably in memory (60000×784 floats = 188 MB), and indexing tensors directly
    is far faster than a DataLoader with per-sample transforms on a small CPU.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    split: str
    classes: list[str]
    preprocess: dict
    source: Path | None = None
    limit: int | None = field(default=None)
    info: dict = field(default_factory=dict)  # reader-specific facts for describe(), e.g. {"partial": True}

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def head(self, n: int) -> ArrayDataset:
        """The first ``n`` samples (a view, no copy) — how ``limit`` and ``limit_train`` subset."""
        if n < 1:
            raise UserError(f"a dataset limit must be at least 1, got {n}")
        limit = n if n < len(self) else self.limit
        return ArrayDataset(
            self.x[:n], self.y[:n], self.name, self.split, self.classes, self.preprocess, self.source, limit,
            dict(self.info),
        )  # fmt: skip

    def describe(self) -> dict:
        """What a bundle manifest or report records about the data used."""
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "limit": self.limit,
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "preprocess": dict(self.preprocess),
            **self.info,
        }


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    download: bool = False,
) -> ArrayDataset:
    """Load a verified split as normalised tensors; ``limit`` keeps the first N samples in file order."""
    reader = get_reader(name)
    spec = get_dataset_spec(name) if reader is None else None
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'", hint=f"use one of: {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if reader is not None:
        return reader.load(split, data_dir=data_dir, limit=limit, download=download)
    assert spec is not None
    folder = resolve_dataset_dir(spec.name, split, data_dir, download)
    known = _known_digests()
    arrays = []
    for f, what in zip(spec.files[split], ("images", "labels"), strict=True):
        path = _locate(folder, f)
        if path is None:  # only after a download that did not deliver; resolve checked the rest
            raise _missing_error(spec, [folder], split)
        data = read_verified(path, f.sha256, f.size, what=f"{spec.title} {split} {what}", known=known)
        arrays.append(parse_idx(data, source=path))
    images, labels = arrays
    n = len(labels) if limit is None else min(limit, len(labels))
    x = torch.from_numpy(images[:n].astype(np.float32)).unsqueeze(1)
    x.mul_(spec.preprocess["scale"]).sub_(spec.mean[0]).div_(spec.std[0])  # exactly what serving does
    y = torch.from_numpy(labels[:n].astype(np.int64))
    return ArrayDataset(
        x=x,
        y=y,
        name=spec.name,
        split=split,
        classes=list(spec.classes),
        preprocess=spec.preprocess,
        source=folder,
        limit=limit if limit is not None and limit < len(labels) else None,
    )
