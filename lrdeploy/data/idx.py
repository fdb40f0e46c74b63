"""IDX file reader (the MNIST family's format), for gzip-compressed or raw files.

The format is tiny: 2 zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per dimension,
then the array in C order. We validate every part of that header against the file length so a truncated or
foreign file fails here with a :class:`UserError` naming the file, rather than later as a reshape error.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from lrdeploy.errors import UserError

_GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype codes -> numpy dtypes (multi-byte types are big-endian in the file).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx_bytes(path: str | os.PathLike, max_size: int | None = None) -> bytes:
    """Return the decompressed bytes of an IDX file (gzip is detected by magic bytes, not by extension).

    ``max_size`` bounds the decompressed size: a download that inflates beyond the expected size is rejected
    without being held in memory in full (the caller sees a length mismatch).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != _GZIP_MAGIC:
                return f.read() if max_size is None else f.read(max_size + 1)
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                return gz.read() if max_size is None else gz.read(max_size + 1)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(
            f"{path} is not a valid gzip file ({exc})",
            hint="the file is truncated or corrupt: delete it and fetch it again",
        ) from None


def parse_idx(data: bytes, source: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Parse decompressed IDX bytes into a read-only numpy array (zero copy for uint8 data)."""
    bad = f"{source} is not a valid IDX file"
    fix = "the file is truncated or corrupt: delete it and fetch it again"
    if len(data) < 4:
        raise UserError(f"{bad} (only {len(data)} bytes)", hint=fix)
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES or ndim == 0:
        raise UserError(f"{bad} (bad magic number 0x{data[:4].hex()})", hint=fix)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{bad} (header cut short)", hint=fix)
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(
            f"{bad} (header promises {expected} bytes for shape {tuple(shape)}, file has {len(data)})",
            hint=fix,
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a numpy array, validating its header against its length."""
    return parse_idx(read_idx_bytes(path), source=path)
