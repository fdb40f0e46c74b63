"""A user's own classification data, named by its path in ``--data`` (two plain formats).

1. **One ``.npz`` file** (``numpy.savez``) holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` and,
   optionally, ``classes`` (one name per class, strings):

   - ``x_*``: ``uint8`` pixels 0–255 as ``N×H×W`` (grayscale) or ``N×H×W×C`` (channels last, as images are
     stored), or floating point as ``N×C×H×W`` (channels first, as PyTorch takes them) or ``N×H×W``;
   - ``y_*``: ``N`` integer labels in ``[0, classes)``; without ``classes`` there are ``max(y_train) + 1``.

2. **An image folder**: ``ROOT/train/<class>/*.png`` and ``ROOT/test/<class>/*.png`` (any format Pillow
   reads: png, jpg, bmp, gif, webp, tiff, pgm/ppm). Classes are the folder names under ``train/``, sorted;
   every image must have the size of the first; grayscale stays one channel, anything else becomes RGB.

Both are normalised as the built-in datasets are: ``(x · scale − mean) / std`` per channel, with ``scale``
1/255 for pixels (1 for float arrays) and ``mean``/``std`` computed on the whole training split. Those
numbers go into the bundle's dataset record (``preprocess``) so every later split — and a deployment — is
normalised the same way, and the data's sha256 goes beside them (``sha256``: of the ``.npz`` file, or of the
sorted list of image paths and their contents) so a later command notices when the data changed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrdeploy.data.datasets import DATASETS, READERS, SPLITS, ArrayDataset
from lrdeploy.errors import UserError

FORMAT_HINT = ("give an .npz file with x_train, y_train, x_test, y_test (optional classes), or a folder with "
               "train/<class>/ and test/<class>/ images (see README, 'Your own model')")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                            ".ppm", ".pbm"})
MAX_NAME = 128  # the manifest's limit on a dataset name
_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
_STATS: dict[str, dict[str, Any]] = {}  # sha256 of the data -> its preprocess (one computation a process)


def is_user_data(name: str | os.PathLike) -> bool:
    """Whether ``--data NAME`` names a user's file or folder: not a built-in dataset name, and a path that
    exists, ends in ``.npz`` or has a directory part (a path that does not exist is then reported as such)."""
    text = str(name).strip()
    if not text or text.lower().replace("_", "-") in {*DATASETS, *READERS}:
        return False
    return (text.lower().endswith(".npz") or os.sep in text or "/" in text
            or Path(text).expanduser().exists())


def load_user_data(path: str | os.PathLike, split: str = "train", limit: int | None = None, *,
                   recorded: Mapping[str, Any] | None = None) -> ArrayDataset:
    """One split of the user's data as a normalised :class:`ArrayDataset` (``limit``: the first N examples).

    ``recorded`` is a bundle's dataset record: when it names the same data, its sha256 must match (the data
    changed otherwise) and its ``preprocess`` is used as it was recorded.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'", hint=f"use one of: {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    given = str(path).strip()
    p = Path(given).expanduser()
    if not p.exists():
        raise UserError(f"data {given} does not exist", FORMAT_HINT)
    name = _record_name(given, p)
    source: _Source = _Npz(p) if p.is_file() else _Folder(p)
    digest = source.sha256()
    same = recorded is not None and recorded.get("name") in (name, given)
    if same and recorded.get("sha256") and recorded["sha256"] != digest:
        raise UserError(f"data {given} changed since the bundle was made (sha256 {digest[:12]}…, the bundle "
                        f"recorded {str(recorded['sha256'])[:12]}…)",
                        "use the data the bundle was trained on, or train a new bundle on this data")
    preprocess = _recorded_preprocess(recorded) if same else None
    if preprocess is None:
        if digest not in _STATS:
            _STATS[digest] = _statistics(source.split("train")[0], source.scale)
        preprocess = _STATS[digest]
    x, y = source.split(split, limit)
    n_classes = len(source.classes)
    _check_labels(y, n_classes, f"data {given}: {_KEYS[split][1] if isinstance(source, _Npz) else split}")
    total = source.count(split)
    return ArrayDataset(
        x=_normalise(x, source.scale, preprocess),
        y=torch.from_numpy(y.astype(np.int64)),
        name=name,
        split=split,
        classes=list(source.classes),
        preprocess=preprocess,
        source=p,
        limit=limit if limit is not None and limit < total else None,
        info={"sha256": digest, "format": source.format},
    )


def _record_name(given: str, p: Path) -> str:
    """The name a bundle records: the absolute path (later commands may run elsewhere) when it fits."""
    absolute = str(p.resolve())
    for candidate in (absolute, given):
        if len(candidate) <= MAX_NAME:
            return candidate
    raise UserError(f"data path {given} is longer than the {MAX_NAME} characters a bundle records",
                    "move the data to a shorter path, or run from its folder and give a relative path")


def _recorded_preprocess(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    pre = (record or {}).get("preprocess")
    if isinstance(pre, Mapping) and {"scale", "mean", "std"} <= set(pre):
        return {"scale": float(pre["scale"]), "mean": [float(v) for v in pre["mean"]],
                "std": [float(v) for v in pre["std"]]}
    return None


def _statistics(x: np.ndarray, scale: float) -> dict[str, Any]:
    """Per-channel mean/std of the training images after scaling (population std; a constant channel: 1)."""
    mean, std = [], []
    for c in range(x.shape[1]):
        channel = x[:, c].astype(np.float64) * scale
        mean.append(float(channel.mean()))
        s = float(channel.std())
        std.append(s if s > 1e-12 else 1.0)
    return {"scale": scale, "mean": mean, "std": std}


def _normalise(x: np.ndarray, scale: float, preprocess: Mapping[str, Any]) -> torch.Tensor:
    mean, std = preprocess["mean"], preprocess["std"]
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise UserError(f"the recorded normalisation has {len(mean)} channel(s), the data {x.shape[1]}",
                        "use the data the bundle was trained on")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t.mul_(float(preprocess["scale"]))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)


def _check_labels(y: np.ndarray, n_classes: int, where: str) -> None:
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        first = int(y[np.argmax(bad)])
        raise UserError(f"{where} holds {int(bad.sum())} label(s) outside [0, {n_classes}) (e.g. {first})",
                        "labels are class indices 0 … classes-1; give a 'classes' array naming every class")


def _sha256_file(path: Path, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


class _Source:
    """One of the two formats: its classes, checksum and splits (read once, then sliced)."""

    format = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def scale(self) -> float:
        """What brings the stored values to [0, 1]: 1/255 for uint8 pixels, 1 for float arrays."""
        return 1.0 / 255.0 if self.split("train")[0].dtype == np.uint8 else 1.0

    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def sha256(self) -> str:
        raise NotImplementedError

    def count(self, split: str) -> int:
        raise NotImplementedError

    def split(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x as N×C×H×W uint8 or float32, y as int) of ``split``, checked; ``limit``: the first N."""
        if split in self._cache:
            x, y = self._cache[split]
            return (x, y) if limit is None else (x[:limit], y[:limit])
        x, y = self._read_split(split, limit)
        if limit is None or limit >= self.count(split):
            self._cache[split] = (x, y)
        return x, y

    def _read_split(self, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class _Npz(_Source):
    format = "npz"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self.npz = np.load(path, allow_pickle=False)
        except Exception as exc:  # BadZipFile, a plain .npy, a truncated archive …
            raise UserError(f"data {path} is not a readable .npz archive ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]})", FORMAT_HINT) from None
        if not hasattr(self.npz, "files"):  # np.load of a single .npy returns an array
            raise UserError(f"data {path} is a single .npy array, not an .npz archive", FORMAT_HINT)
        missing = [k for keys in _KEYS.values() for k in keys if k not in self.npz.files]
        if missing:
            raise UserError(f"data {path} lacks the array(s) {', '.join(missing)} (it holds "
                            f"{', '.join(self.npz.files) or 'nothing'})", FORMAT_HINT)
        self._classes: list[str] | None = None

    def _array(self, key: str) -> np.ndarray:
        try:
            return self.npz[key]
        except ValueError as exc:  # object arrays need pickle, which is never allowed
            raise UserError(f"data {self.path}: array {key} cannot be read without pickle ({exc})",
                            "save plain numeric arrays (and classes as strings)") from None

    def sha256(self) -> str:
        return _sha256_file(self.path).hexdigest()

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            y_train = self.split("train")[1]
            if "classes" in self.npz.files:
                names = self._array("classes")
                if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
                    raise UserError(f"data {self.path}: classes must be a 1-D array of names (strings), got "
                                    f"{names.dtype} of shape {names.shape}", FORMAT_HINT)
                self._classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
            else:
                self._classes = [str(i) for i in range(int(y_train.max()) + 1 if len(y_train) else 0)]
        return self._classes

    def count(self, split: str) -> int:
        return len(self.split(split)[1])

    def _read_split(self, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._read(split)
        self._cache[split] = (x, y)  # the archive's arrays are whole anyway
        return (x, y) if limit is None else (x[:limit], y[:limit])

    def _read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        xk, yk = _KEYS[split]
        where = f"data {self.path}"
        x, y = self._array(xk), self._array(yk)
        if x.dtype == np.uint8:
            if x.ndim == 3:
                x = x[:, None]
            elif x.ndim == 4 and x.shape[3] <= 4:
                x = x.transpose(0, 3, 1, 2)
            else:
                raise UserError(f"{where}: {xk} is uint8 of shape {x.shape}; uint8 images are N×H×W or "
                                "N×H×W×C with C ≤ 4 (channels last)",
                                "save pixels as N×H×W×C, or float32 as N×C×H×W")
        elif x.dtype.kind == "f":
            if x.ndim == 3:
                x = x[:, None]
            elif x.ndim != 4:
                raise UserError(f"{where}: {xk} has shape {x.shape}; float images are N×C×H×W or N×H×W",
                                FORMAT_HINT)
            x = x.astype(np.float32, copy=False)
            finite = np.isfinite(x)
            if not finite.all():
                raise UserError(f"{where}: {xk} holds {int(x.size - finite.sum())} NaN/Inf value(s)",
                                "clean the data: every pixel must be a finite number")
        else:
            raise UserError(f"{where}: {xk} has dtype {x.dtype}; images are uint8 (0–255) or float",
                            "save x as uint8 pixels or float32")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise UserError(f"{where}: {yk} must be a 1-D array of integer labels, got {y.dtype} of shape "
                            f"{y.shape}", "save labels as int64 class indices")
        if len(y) != len(x):
            raise UserError(f"{where}: {xk} has {len(x)} examples but {yk} has {len(y)} labels", FORMAT_HINT)
        if len(y) == 0:
            raise UserError(f"{where}: {xk} is empty", "give at least one example per split")
        if split == "test":
            train_x = self.split("train")[0]
            if x.shape[1:] != train_x.shape[1:] or x.dtype != train_x.dtype:
                raise UserError(f"{where}: x_test samples are {x.dtype} {tuple(x.shape[1:])} (C×H×W), "
                                f"x_train samples {train_x.dtype} {tuple(train_x.shape[1:])}",
                                "both splits must hold images of one shape and dtype")
        return x, y


class _Folder(_Source):
    format = "image-folder"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        missing = [s for s in SPLITS if not (path / s).is_dir()]
        if missing:
            raise UserError(f"data {path} is a folder without {' and '.join(f'{s}/' for s in missing)}",
                            FORMAT_HINT)
        self._classes = sorted(d.name for d in (path / "train").iterdir()
                               if d.is_dir() and not d.name.startswith("."))
        if not self._classes:
            raise UserError(f"data {path}/train holds no class folders", FORMAT_HINT)
        self.files = {s: self._list(s) for s in SPLITS}
        self._mode: str | None = None
        self._size: tuple[int, int] | None = None

    def _list(self, split: str) -> list[tuple[Path, int]]:
        root = self.path / split
        extra = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                       and d.name not in self._classes)
        if extra:
            raise UserError(f"data {root} has class folder(s) {', '.join(extra[:4])} that train/ lacks",
                            "every test class needs a train/ folder of the same name")
        files = [(f, label) for label, cls in enumerate(self._classes) if (root / cls).is_dir()
                 for f in sorted((root / cls).iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
        if not files:
            raise UserError(f"data {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", FORMAT_HINT)
        # A fixed shuffle, so that a limit (--limit-train/--limit-test) takes every class, not the first ones.
        order = np.random.default_rng(0).permutation(len(files))
        return [files[i] for i in order]

    @property
    def classes(self) -> list[str]:
        return self._classes

    def sha256(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            for f, _ in sorted(self.files[split]):
                h.update(f.relative_to(self.path).as_posix().encode() + b"\0")
                h.update(_sha256_file(f).digest())
        return h.hexdigest()

    def count(self, split: str) -> int:
        return len(self.files[split])

    @property
    def scale(self) -> float:
        return 1.0 / 255.0

    def _read_split(self, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        files = self.files[split][:limit]
        x = np.stack([self._read(f) for f, _ in files])
        y = np.asarray([label for _, label in files], dtype=np.int64)
        return x, y

    def _read(self, path: Path) -> np.ndarray:
        try:
            from PIL import Image
        except ImportError:
            raise UserError("reading an image folder needs Pillow", "pip install pillow, or give an .npz file"
                            ) from None
        try:
            with Image.open(path) as img:
                img.load()
                if self._mode is None:
                    self._mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                    self._size = img.size
                if img.size != self._size:
                    raise UserError(f"image {path} is {img.size[0]}×{img.size[1]}, the first image "
                                    f"{self._size[0]}×{self._size[1]}", "resize every image to one size")
                pixels = np.asarray(img.convert(self._mode), dtype=np.uint8)
        except UserError:
            raise
        except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, decompression bombs …
            raise UserError(f"image {path} cannot be read ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]})", "remove or re-save it") from None
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
