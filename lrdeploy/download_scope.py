"""`--download` for one command: loaders deep in the workflows honour it without an argument threaded
through every call. Off unless asked: nothing is fetched by surprise. Free of heavy imports, because the CLI
enters this scope before every command (a refused command should not pay for importing torch)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_DOWNLOADS: ContextVar[bool] = ContextVar("lrdeploy_downloads", default=False)


@contextlib.contextmanager
def downloads_allowed(enabled: bool = True) -> Iterator[None]:
    """Within the block, loaders fetch missing dataset files (checksum-verified) as if ``download=True``."""
    token = _DOWNLOADS.set(enabled)
    try:
        yield
    finally:
        _DOWNLOADS.reset(token)


def download_wanted(download: bool) -> bool:
    """``download`` or the scope of :func:`downloads_allowed`."""
    return download or _DOWNLOADS.get()
