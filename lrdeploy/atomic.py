"""Atomic artefact writes: a crash leaves either the old artefact or the new one, never half of one.

One file is written to a temporary sibling and renamed. A *family* of files or directories (a bundle; an
export's model, optimised copy, fold report, precision variants and engine; a run's report files) is written
into a staging directory beside its targets and installed by :class:`Staging` with a redo journal:

1. everything is written under ``<parent>/.lrdeploy-stage.<pid>.<id>/new/``;
2. ``journal.json`` (what to install, what to remove) is written and synced — the commit point;
3. each target is moved aside into ``old/`` and its new version renamed into place; then the stage is removed.

A run killed before step 2 leaves the old family untouched (the stage is debris); one killed during step 3
leaves a journal, and :func:`recover` — called by the next writer and by every reader of that directory —
rolls it forward, so the new family appears complete. ``FAULT_HOOK`` lets a test kill the writer at each step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

STAGE_PREFIX = ".lrdeploy-stage."
JOURNAL = "journal.json"

# Called with the name of each step of a commit ("staged", "journal", "aside:<name>", "installed:<name>",
# "removed:<name>", "done"); tests set it in a subprocess to SIGKILL the writer at that step.
FAULT_HOOK: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts should get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def temporary_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto ``path`` (a file).

    Use it when a library insists on writing to a path itself (``torch.onnx.export``, ORT's optimiser).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``; an existing directory at ``dst`` is swapped out, then removed.

    Two renames, so not crash-safe for directories: artefact families use :class:`Staging` instead.
    """
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def exists(path: Path) -> bool:
    """Present on disk, a dangling symlink included (``Path.exists`` follows links)."""
    return path.exists() or path.is_symlink()


class Staging:
    """Stage a family of entries beside their targets in ``parent`` and install them all at once.

    ``replaces`` names entries of ``parent`` that belong to the family: any of them the new run does not
    write is removed at commit (so no stale sibling of a previous export stays beside the new model).
    Use as a context manager: committed on success, discarded on an exception.
    """

    def __init__(self, parent: str | os.PathLike, *, replaces: Iterable[str] = ()) -> None:
        self.parent = Path(parent)
        self.replaces = sorted(set(replaces))
        recover(self.parent)
        self.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.parent / f"{STAGE_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:12]}"
        os.mkdir(self.dir)
        self.new = self.dir / "new"
        os.mkdir(self.new)
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write the entry that will appear as ``parent/name``."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        return self.new / name

    def final(self, staged: str | os.PathLike) -> Path:
        """The installed path of a staged path (for messages that name what was written)."""
        rel = Path(staged).relative_to(self.new)
        return self.parent / rel

    def commit(self) -> list[Path]:
        """Install every staged entry (the journal makes it all-or-nothing across a crash)."""
        install = sorted(os.listdir(self.new))
        remove = [n for n in self.replaces if n not in install and exists(self.parent / n)]
        _step("staged")
        data = json.dumps({"install": install, "remove": remove}).encode("utf-8")
        with open(self.dir / JOURNAL, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.dir)
        _step("journal")
        _apply(self.dir, install, remove)
        _step("done")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.committed = True
        return [self.parent / n for n in install]

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        elif not self.committed:
            self.discard()


def _apply(stage: Path, install: list[str], remove: list[str]) -> None:
    """Roll the journal forward; idempotent, so a crash in the middle is finished by :func:`recover`."""
    parent = stage.parent
    old = stage / "old"
    old.mkdir(exist_ok=True)
    for name in install:
        new, target = stage / "new" / name, parent / name
        if not exists(new):
            continue  # installed before the crash
        if exists(target):  # the previous version: the new one has not been moved in yet
            _set_aside(target, old / name)
            _step(f"aside:{name}")
        os.replace(new, target)
        _step(f"installed:{name}")
    for name in remove:
        target = parent / name
        if exists(target):
            _set_aside(target, old / name)
            _step(f"removed:{name}")
    _fsync_dir(parent)


def _set_aside(target: Path, aside: Path) -> None:
    """Move the old version out of the way (deleted with the stage); one already set aside wins."""
    if exists(aside):
        _remove(target)
    else:
        os.replace(target, aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers signal 0; it is dead for our purpose
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def recover(parent: str | os.PathLike) -> list[str]:
    """Finish or discard what killed writers left in ``parent``; returns what was done, one line each.

    A stage with a journal is rolled forward (its family was committed); one without is removed (its family
    never was). Stages of live processes are left alone: that writer is still at work.
    """
    parent = Path(parent)
    done: list[str] = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(STAGE_PREFIX)]
    except OSError:
        return done
    for name in names:
        stage = parent / name
        try:
            pid = int(name[len(STAGE_PREFIX):].split(".", 1)[0])
        except ValueError:
            continue
        if _alive(pid) or not stage.is_dir() or stage.is_symlink():
            continue
        journal = stage / JOURNAL
        try:
            plan = json.loads(journal.read_text(encoding="utf-8"))
            install, remove = list(plan["install"]), list(plan["remove"])
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(stage, ignore_errors=True)
            done.append(f"removed the debris of an interrupted write ({name})")
            continue
        _apply(stage, install, remove)
        shutil.rmtree(stage, ignore_errors=True)
        done.append(f"finished an interrupted write of {', '.join(install)}")
    return done


def rewrite_paths(stage: Staging) -> None:
    """Reports staged beside their artefacts name the staging path; make them name where they will appear.

    Bundle manifests are left alone: they are sealed by their digest and record no output path.
    """
    pairs = [(json.dumps(str(stage.new))[1:-1], json.dumps(str(stage.parent))[1:-1]),
             (str(stage.new), str(stage.parent))]
    for path in [*stage.new.rglob("*.json"), *stage.new.rglob("*.md")]:
        if path.name == "manifest.json" or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if any(old in text for old, _ in pairs):
            for old, new in pairs:
                text = text.replace(old, new)
            write_text(path, text)
