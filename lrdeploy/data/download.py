"""Checksum-verified download of a dataset from its canonical mirrors, for users with a network.

All files are fetched into a hidden staging folder beside the destination, verified (content sha256, see
:mod:`lrdeploy.data.checksum`), and only then moved into place, so a failed or tampered download leaves
nothing behind — not even a half-filled dataset folder that a later load would trip over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from lrdeploy import __version__
from lrdeploy.data.checksum import read_verified
from lrdeploy.data.datasets import (
    FileSpec,
    _known_digests,
    _locate,
    default_cache_dir,
    get_dataset_spec,
    get_reader,
)
from lrdeploy.errors import UserError

_CHUNK = 1 << 20


def _fetch(url: str, dest: Path, limit: int, timeout: float) -> None:
    """Stream ``url`` into ``dest``, refusing more than ``limit`` bytes (a misbehaving server cannot fill the
    disk)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"lrdeploy/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        received = 0
        while chunk := response.read(_CHUNK):
            received += len(chunk)
            if received > limit:
                raise OSError(f"more than {limit} bytes")
            out.write(chunk)


def _already_valid(folder: Path, f: FileSpec) -> bool:
    path = _locate(folder, f)
    if path is None:
        return False
    try:
        read_verified(path, f.sha256, f.size)
    except UserError:
        return False
    return True


def download_dataset(
    name: str,
    dest: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``name`` into ``dest/<folder>`` (default: the user cache) and return that folder.

    Files already present and valid are kept. Each missing file is tried on each mirror in turn (``mirrors``
    overrides the canonical base URLs; any urllib scheme works, tests use ``file://``). A checksum mismatch on
    one mirror moves on to the next; if no mirror delivers a valid copy, :class:`UserError` says why per URL.
    Datasets with their own reader (CIFAR-10) download their own way; ``mirrors`` are then full URLs.
    """
    reader = get_reader(name)
    if reader is not None:
        return reader.download(dest, mirrors=mirrors, timeout=timeout)
    spec = get_dataset_spec(name)
    root = Path(dest).expanduser() if dest is not None else default_cache_dir()
    target = root / spec.folder
    needed = [f for f in spec.all_files() if not (target.is_dir() and _already_valid(target, f))]
    if not needed:
        return target
    bases = list(mirrors) if mirrors is not None else list(spec.mirrors)
    known = _known_digests()
    return fetch_files(needed, bases, root, target, title=spec.title, timeout=timeout, known=known)


def fetch_files(
    needed: Sequence[FileSpec],
    bases: Sequence[str],
    root: Path,
    target: Path,
    *,
    title: str,
    timeout: float,
    known: dict[str, str] | None = None,
) -> Path:
    """Fetch every file of ``needed`` (FileSpecs) from the first mirror in ``bases`` that serves a verified
    copy, into a hidden staging folder under ``root``; move them into ``target`` only when all passed.

    All or nothing: a failure leaves no file and no folder this call created.
    """
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=root))
    ok = False
    try:
        for f in needed:
            tmp = stage / f.filename
            failures = []
            for base in bases:
                url = base.rstrip("/") + "/" + f.filename
                try:
                    _fetch(url, tmp, limit=f.size + (1 << 20), timeout=timeout)  # gzip is smaller than text
                    read_verified(tmp, f.sha256, f.size, what=f"downloaded from {url}", known=known)
                    break
                except UserError as exc:
                    failures.append(f"{url}: {exc.message}")
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    failures.append(f"{url}: {exc}")
            else:
                reasons = "; ".join(failures) or "no mirror given"
                raise UserError(
                    f"could not download {title} {f.filename}: {reasons}",
                    hint="check the network, or fetch the files by hand and pass --data-dir",
                )
        target.mkdir(exist_ok=True)
        for f in needed:
            os.replace(stage / f.filename, target / f.filename)
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:  # remove only the (then empty) folders this call created
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()
    return target
