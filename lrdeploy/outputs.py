"""What a command will write, checked before it does any work.

Every command that writes declares its outputs here first, so one set of rules holds everywhere:
- an output is never one of the command's inputs (nor inside one, nor an input inside a directory output);
- nothing that exists is replaced unless ``--force`` is given, and then only what lrdeploy itself writes (a
  directory that is not one of its own artefacts is never replaced whole);
- the destination must be writable (probed by creating a file there), so no command fails after the work;
- nothing is ever written into a bundle directory, which holds only its own two files.
The writing itself goes through :class:`lrdeploy.atomic.Staging`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from lrdeploy.atomic import exists as _exists
from lrdeploy.atomic import recover
from lrdeploy.errors import UserError

FORCE_HINT = "pass --force to replace it, or choose another path"


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve(strict=False)
    except (OSError, RuntimeError):  # symlink loop
        return path.absolute()


# A bundle's names live here (not in lrdeploy.bundle, which imports torch) so the CLI can check --out at once.
BUNDLE_FORMAT = "lrdeploy-bundle"
BUNDLE_MANIFEST = "manifest.json"
BUNDLE_WEIGHTS = "weights.safetensors"
BUNDLE_FILES = frozenset({BUNDLE_MANIFEST, BUNDLE_WEIGHTS})


def is_bundle_dir(path: Path) -> bool:
    """A directory holding an lrdeploy bundle manifest (cheap; does not validate it)."""
    try:
        manifest = json.loads((path / BUNDLE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT


def is_replaceable_bundle(path: Path) -> bool:
    """Our bundle, holding nothing lrdeploy did not write (replacing it loses nothing of the user's)."""
    return is_bundle_dir(path) and all(p.name in BUNDLE_FILES for p in path.iterdir())


def check_bundle_destination(out: str | os.PathLike, *, force: bool = False,
                             inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """``out`` can take a bundle: new, empty, or (with ``force``) one of our bundles. Light: no torch import,
    so the CLI refuses a bad --out at once."""
    Outputs(force=force, inputs=inputs).directory(out, "--out", what="bundle", is_ours=is_replaceable_bundle)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if _exists(candidate):
            return candidate
    return Path("/")


def check_writable(path: Path, flag: str) -> None:
    """``path``'s directory (or the nearest one that exists) can take new files: probed, not guessed."""
    parent = _nearest_existing(path.parent if path.parent != Path("") else Path("."))
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory", "choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lrdeploy-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"{flag} {path}: cannot write in {parent} ({exc.strerror or type(exc).__name__})",
            "choose a writable location",
        ) from None


class Outputs:
    """The outputs of one command run, each checked against the rules above when declared."""

    def __init__(self, *, force: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
        self.force = force
        self.inputs: list[Path] = [Path(p) for p in inputs if p is not None]
        self.claimed: list[tuple[Path, str, bool]] = []  # (resolved target, flag, a whole directory)
        for src in self.inputs:  # a killed writer's committed install is finished before anything reads it
            recover(src.parent if str(src.parent) else Path("."))

    # --- the rules every kind of output shares ---
    def _not_an_input(self, target: Path, flag: str, *, whole_dir: bool = False) -> None:
        t = _resolved(target)
        for src in self.inputs:
            s = _resolved(src)
            same = t == s
            if not same and _exists(target) and _exists(src):
                with contextlib.suppress(OSError):
                    same = os.path.samefile(target, src)
            if same:
                raise UserError(f"{flag} {target} is also an input of this command ({src})",
                                "write the output to another path")
            if s in t.parents and src.is_dir():
                raise UserError(f"{flag} {target} lies inside the input {src}",
                                    "write the output outside it")
            if whole_dir and t in s.parents:
                raise UserError(f"{flag} {target} holds the input {src}; replacing it would delete the input",
                                "write the output to another directory")
        for ancestor in t.parents:
            if is_bundle_dir(ancestor):
                raise UserError(f"{flag} {target} lies inside the bundle {ancestor}",
                                "bundles hold only their own files; write it elsewhere")
            break  # a bundle is flat: only the immediate parent can be one

    def _claim(self, targets: Iterable[Path], flag: str, *, whole_dir: bool = False) -> None:
        """Two outputs of one command may not be the same path, nor one inside the other's directory."""
        for target in targets:
            t = _resolved(target)
            for other, other_flag, other_whole in self.claimed:
                if t == other or (other_whole and other in t.parents) or (whole_dir and t in other.parents):
                    raise UserError(f"{flag} {target} collides with what {other_flag} writes",
                                    "give each output its own path")
            self.claimed.append((t, flag, whole_dir))

    # --- kinds of output ---
    def file(self, path: str | os.PathLike | None, flag: str) -> Path | None:
        """One file (``--json report.json``), replaced atomically."""
        if path is None:
            return None
        path = Path(path)
        self._not_an_input(path, flag)
        if path.is_dir():
            raise UserError(f"{flag} {path} is a directory", f"give a file path, e.g. {flag} result.json")
        if _exists(path) and not self.force:
            raise UserError(f"{flag} {path} exists", FORCE_HINT)
        check_writable(path, flag)
        self._claim([path], flag)
        return path

    def family(self, path: str | os.PathLike, flag: str, names: Iterable[str]) -> Path:
        """Files that appear together beside ``path`` (an export: model, optimised copy, fold report …)."""
        path = Path(path)
        siblings = [path.parent / n for n in dict.fromkeys([path.name, *names])]
        for sibling in siblings:
            self._not_an_input(sibling, flag)
            if sibling.is_dir() and not sibling.is_symlink():
                raise UserError(f"{flag} {path}: {sibling} is a directory", "choose another path")
        existing = [s.name for s in siblings if _exists(s)]
        if existing and not self.force:
            shown = ", ".join(existing[:4]) + (f" (+{len(existing) - 4} more)" if len(existing) > 4 else "")
            raise UserError(f"{flag} {path} would replace {shown}", "pass --force to replace them, or choose "
                            "another path")
        check_writable(path, flag)
        self._claim(siblings, flag)
        return path

    def files_in(self, directory: str | os.PathLike | None, flag: str, names: Iterable[str]) -> Path | None:
        """Files written together into a directory that may hold other things (a report's files)."""
        if directory is None:
            return None
        directory = Path(directory)
        self._not_an_input(directory, flag)
        if _exists(directory) and not directory.is_dir():
            raise UserError(f"{flag} {directory} exists and is not a directory", "give a directory")
        if is_bundle_dir(directory):
            raise UserError(f"{flag} {directory} is a bundle", "bundles hold only their own files; write the "
                            "report elsewhere")
        existing = [n for n in names if _exists(directory / n)]
        if existing and not self.force:
            raise UserError(f"{flag} {directory} already holds {', '.join(existing)}", "pass --force to "
                            "replace them, or choose another directory")
        check_writable(directory / "x", flag)
        self._claim([directory / n for n in names], flag)
        return directory

    def directory(self, path: str | os.PathLike | None, flag: str, *, what: str,
                  is_ours: Callable[[Path], bool]) -> Path | None:
        """A directory written and replaced whole (a bundle, a golden set, the demo's run)."""
        if path is None:
            return None
        path = Path(path)
        self._not_an_input(path, flag, whole_dir=True)
        if _exists(path) and (not path.is_dir() or path.is_symlink()):
            raise UserError(f"{flag} {path} exists and is not a directory", "choose another path")
        if path.is_dir() and any(path.iterdir()):
            if not self.force:
                raise UserError(f"{flag} {path} exists", FORCE_HINT)
            if not is_ours(path):
                raise UserError(f"{flag} {path} is not an lrdeploy {what}; even with --force lrdeploy only "
                                f"replaces its own {what}s", "choose a new or empty directory")
        check_writable(path, flag)
        self._claim([path], flag, whole_dir=True)
        return path


EXPORT_SUFFIXES = (".onnx", ".ort.onnx", ".fold.json", ".fp16.onnx", ".bf16.onnx", ".int8.onnx",
                   ".int8.trt.onnx", ".plan", ".plan.json", ".tokenizer.json")


def export_family(out: Path) -> list[str]:
    """The names an export to ``out`` (``model.onnx``) may write beside it: one family, replaced together."""
    stem = out.name[: -len(".onnx")] if out.name.endswith(".onnx") else out.stem
    return [stem + suffix for suffix in EXPORT_SUFFIXES]
