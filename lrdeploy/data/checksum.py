"""Checksum verification of dataset files, with an in-memory cache of files already verified.

We verify the sha256 of the *decompressed* IDX content, not of the ``.gz`` stream. The same dataset circulates
in several gzip encodings (Debian's Fashion-MNIST streams differ from Zalando's upstream ones; users may also
hold the extracted files, as torchvision leaves them): the content digest accepts every faithful copy and
rejects every altered one, and we decompress the file to load it anyway, so it costs one sha256 pass (~30 ms
for MNIST's 47 MB of training images). Verified files are remembered by (path, size, mtime) so repeated
loads in one process skip the hash; a file replaced or touched in between is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lrdeploy.data.idx import read_idx_bytes
from lrdeploy.errors import UserError

_VERIFIED: dict[tuple[str, int, int], str] = {}


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def clear_cache() -> None:
    """Forget which files were verified (tests use it; a long-lived process might too)."""
    _VERIFIED.clear()


def mark_verified(path: str | os.PathLike, digest: str) -> None:
    """Remember that ``path`` (as it is now) matched ``digest``; readers of other formats share the cache."""
    _VERIFIED[_key(Path(path))] = digest


def is_verified(path: str | os.PathLike, sha256: str) -> bool:
    """True when ``path`` was verified against ``sha256`` in this process and has not changed since."""
    try:
        return _VERIFIED.get(_key(Path(path))) == sha256
    except OSError:
        return False


def read_verified(
    path: str | os.PathLike,
    sha256: str,
    size: int,
    *,
    what: str = "",
    known: dict[str, str] | None = None,
) -> bytes:
    """Return the decompressed content of ``path`` after checking its size and sha256.

    ``known`` maps other content digests to a description (e.g. "MNIST train images") so a mismatch can say
    what the file actually is — MNIST and Fashion-MNIST share file names, and mixing their folders is the
    likeliest mistake.
    """
    path = Path(path)
    key = _key(path)
    data = read_idx_bytes(path, max_size=size)
    if _VERIFIED.get(key) == sha256 and len(data) == size:
        return data
    digest = hashlib.sha256(data).hexdigest() if len(data) == size else None
    if digest != sha256:
        label = f" ({what})" if what else ""
        if digest is None:
            got = f"more than {size}" if len(data) > size else str(len(data))
            problem = f"{path}{label} has the wrong length ({got} bytes decompressed, expected {size})"
        else:
            problem = (
                f"{path}{label} fails its checksum (content sha256 {digest[:16]}…, expected {sha256[:16]}…)"
            )
        other = (known or {}).get(digest or "")
        if other:
            raise UserError(
                f"{problem}; it is the {other} file",
                hint="this folder holds another dataset's files: point --data-dir at the right folder",
            )
        raise UserError(
            problem,
            hint="the file is corrupt or truncated: delete it and fetch it again "
            "(--download where there is a network)",
        )
    _VERIFIED[key] = sha256
    return data
