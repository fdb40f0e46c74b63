"""Checks on what the user typed, run before any command does work: one line and exit 2 instead of a hang,
a 29 GiB MemoryError, a NaN that silently passes every budget, or a six-line usage box.

- :class:`OneLineUsageGroup`: Click's own usage errors (bad integer, out of range, missing or unknown option)
  become ``error: <message> — see `lrdeploy CMD --help``` on one stderr line, exit 2, for the whole app.
- :func:`check_arguments`: every command's parsed values, generically: floats must be finite (NaN compares
  false with every budget and ``inf`` seconds never end), integers must fit in 64 bits (numpy and torch raise
  OverflowError past that), and ``--data-dir`` must be a directory (symlinks followed).
- Memory: :func:`check_batch_fits` and :func:`check_model_fits` estimate the bytes an option sizes (the
  input batch; the model's weights, built on torch's ``meta`` device so nothing is allocated) and refuse what
  exceeds :func:`available_memory`, naming the estimate and the limit. The estimates are lower bounds
  (activations come on top), so nothing that could fit is ever refused.

Module import stays light (no torch/onnx at import): the CLI imports it at start-up.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from typer.core import TyperGroup

from lrdeploy.errors import UserError

try:  # Typer >= 0.2x vendors Click as typer._click
    from typer._click import exceptions as click_exceptions
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older Typer on PyPI Click
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
    from click.globals import get_current_context  # type: ignore[no-redef]

INT64_MAX = 2**63 - 1
DAY_S = 86400.0  # upper bound of every "seconds" option: longer is a typo, not a benchmark

_err = Console(stderr=True)


def print_error(message: str) -> None:
    """``error: message`` on one stderr line, never wrapped (the convention of ``UserError``)."""
    _err.print("[bold red]error:[/] ", end="", soft_wrap=True)
    _err.print(" ".join(message.split()), markup=False, soft_wrap=True, highlight=False)


# ------------------------------------------------------------------------------------------ usage errors
class OneLineUsageGroup(TyperGroup):
    """The app's group: a Click usage error of the group or of any command is printed as one line.

    Typer's default is a usage line, a "Try --help" line and a boxed message; scripts and CI logs want the
    convention of every other lrdeploy error. ``--help`` and the bare ``lrdeploy`` help are untouched.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click_exceptions.ClickException as exc:
            _reraise_one_line(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except click_exceptions.ClickException as exc:
            _reraise_one_line(exc)


def _raw_input(exc: Any) -> str | int | float | None:
    """What the user typed for a value Typer's validation (pydantic) refused, when it says."""
    errors = getattr(exc.__cause__, "errors", None)
    try:
        raw = errors()[0].get("input") if callable(errors) else None
    except (IndexError, AttributeError, TypeError):
        return None
    return raw if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else None


def usage_message(exc: Any) -> str:
    """The one-line text of a Click exception (with the refused value), and where to read the help."""
    raw = _raw_input(exc) if isinstance(exc, click_exceptions.BadParameter) else None
    if raw is not None:
        try:
            finite = math.isfinite(float(raw))
        except (ValueError, OverflowError):
            finite = True
        reason = str(exc.message)
        exc.message = (f"{raw} is not a finite number" if not finite  # not "should be <= 1" for a NaN
                       else f"got {raw}, {reason[:1].lower()}{reason[1:]}")
    message = " ".join(str(exc.format_message()).split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_exceptions.UsageError) and ctx is not None:
        message += f" — see `{ctx.command_path} --help`"
    return message


def _reraise_one_line(exc: Any) -> None:
    import typer

    if isinstance(exc, click_exceptions.NoArgsIsHelpError):  # bare `lrdeploy`: the help, as before
        raise exc
    print_error(usage_message(exc))
    raise typer.Exit(code=exc.exit_code) from None


# ------------------------------------------------------------------------------------- generic arguments
def _flag_names(ctx: Any) -> dict[str, str]:
    """Parameter name -> the flag the user typed it with (``json_path`` -> ``--json``)."""
    names: dict[str, str] = {}
    for param in getattr(getattr(ctx, "command", None), "params", []) or []:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        names[param.name] = opts[0] if opts else param.name.upper()
    return names


def check_arguments(values: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> None:
    """Refuse meaningless parsed values of any command: NaN/inf floats, integers beyond 64 bits, and a
    ``data_dir`` that is not a directory. ``flags`` maps parameter names to their flags (default: the
    current Click command's, else ``--name-with-dashes``)."""
    if flags is None:
        flags = _flag_names(get_current_context(silent=True))
    for name, value in values.items():
        flag = flags.get(name) or "--" + name.replace("_", "-")
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float):
                check_finite(flag, item)
            elif isinstance(item, int) and not isinstance(item, bool):
                check_int64(item, flag)
    if values.get("data_dir") is not None:
        check_data_dir(Path(values["data_dir"]), flags.get("data_dir") or "--data-dir")


def check_finite(
    flag: str, value: float | None, *, minimum: float | None = None, maximum: float | None = None,
    strict: bool = False, example: str | None = None,
) -> float | None:
    """``value`` if finite and within ``[minimum, maximum]`` (``strict``: above ``minimum``); None passes.

    NaN passes no comparison and fails none (a NaN budget is never missed; a NaN learning rate trains to
    NaN); inf seconds never end. Typer's ``min=``/``max=`` let both through where a bound is missing.
    """
    if value is None:
        return None
    lo = "" if minimum is None else (f"> {minimum:g}" if strict else f">= {minimum:g}")
    hi = "" if maximum is None else f"<= {maximum:g}"
    wanted = " and ".join(b for b in (lo, hi) if b)
    hint = (f"e.g. {flag} {example}" if example is not None
            else f"give {flag} a number {wanted}" if wanted else f"give {flag} a finite number")
    if not math.isfinite(value):
        raise UserError(f"{flag} {value} is not a finite number", hint)
    below = minimum is not None and (value <= minimum if strict else value < minimum)
    above = maximum is not None and value > maximum
    if below or above:
        raise UserError(f"{flag} {value:g} must be {wanted}", hint)
    return value


def check_int64(value: int, flag: str) -> int:
    """Integers past 64 bits parse in Python but overflow in numpy and torch."""
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise UserError(f"{flag} {value} is too large: integers must fit in 64 bits (at most {INT64_MAX})",
                        f"give a smaller {flag}")
    return value


def check_data_dir(path: Path, flag: str = "--data-dir") -> Path:
    """A data directory that exists must be a directory (a symlink to one is fine). One that does not
    exist is left to the loader, which says so, or to ``--download``, which creates it."""
    if path.is_dir():  # follows symlinks
        return path
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag} {path} is a broken symbolic link (to {os.readlink(path)})",
                        "point it at the folder holding the dataset")
    if path.exists():
        raise UserError(f"{flag} {path} is a file, not a directory",
                        "pass the folder that holds the dataset files (e.g. the one holding mnist/)")
    return path


# ----------------------------------------------------------------------------------------------- memory
def _meminfo_available(text: str) -> int | None:
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 says "no limit" with a huge number
            return max(0, int(limit) - usage)
        return None
    return None


def available_memory() -> int | None:
    """Bytes of memory this process can still get: MemAvailable (/proc/meminfo), capped by the cgroup's
    headroom; ``os.sysconf`` free pages where /proc is missing; None when nothing says."""
    try:
        available = _meminfo_available(Path("/proc/meminfo").read_text())
    except OSError:
        available = None
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def format_bytes(n: float) -> str:
    for factor, unit in ((2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.3g} {unit}" if n / factor < 1e4 else f"{n:.2e} B"
    return f"{n:.0f} B"


def check_fits(nbytes: int, flag: str, what: str, hint: str, available: int | None = None) -> None:
    """Refuse ``nbytes`` (an estimate of what ``flag`` makes lrdeploy allocate) above available memory."""
    available = available_memory() if available is None else available
    if available is not None and nbytes > available:
        raise UserError(f"{flag}: {what} would take {format_bytes(nbytes)}, more than the "
                        f"{format_bytes(available)} of memory available", hint)


def batch_input_bytes(sample_shape: Sequence[int], batch: int, itemsize: int = 4) -> int:
    """Bytes of one input batch: batch × elements of one sample × item size (Python ints: no overflow)."""
    return batch * math.prod(int(d) for d in sample_shape) * itemsize


def check_batch_fits(sample_shape: Sequence[int] | None, batches: Iterable[int], flag: str = "--batch",
                     itemsize: int = 4, available: int | None = None) -> None:
    """The largest input batch (float32 by default) must fit in memory; unknown shapes are not checked."""
    batches = list(batches)
    if sample_shape is None or not batches:
        return
    for b in batches:
        check_int64(b, flag)
    batch = max(batches)
    shape = "×".join(str(int(d)) for d in sample_shape) or "scalar"
    check_fits(batch_input_bytes(sample_shape, batch, itemsize), flag,
               f"an input batch of {batch} samples of {shape} ({itemsize}-byte values)",
               f"use a smaller {flag}", available)


def model_bytes(model_name: str, args: Mapping[str, Any], flag: str = "--model-arg") -> int | None:
    """Bytes of a registry model's parameters and buffers with ``args``, built on the ``meta`` device
    (shapes only, nothing allocated). Arguments the builder does not take are left out (``create_model``
    reports them); None when the model cannot be built on ``meta``, so the real build decides."""
    import inspect

    import torch

    from lrdeploy.models import create_model, get_spec

    spec = get_spec(model_name)
    accepted = inspect.signature(spec.builder).parameters
    args = {k: v for k, v in args.items() if k in accepted}
    for key, value in args.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise UserError(f"{flag}: {key}={value} is too large: integers must fit in 64 bits",
                            f"give a smaller {key}")
    shown = ", ".join(f"{k}={v}" for k, v in args.items()) or "its defaults"
    try:
        with torch.device("meta"):
            model = create_model(model_name, **args)
    except UserError:
        raise
    except (RuntimeError, TypeError, OverflowError) as exc:
        if "overflow" in str(exc).lower():
            raise UserError(f"{flag}: model '{spec.name}' with {shown} is too large to build "
                            f"({type(exc).__name__}: size overflow)", f"give a smaller {flag}") from None
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_model_fits(model_name: str, args: Mapping[str, Any], flag: str,
                     available: int | None = None) -> None:
    """The model's weights alone (training and saving need more) must fit in available memory."""
    nbytes = model_bytes(model_name, args, flag)
    if nbytes is None:
        return
    shown = ", ".join(f"{k}={v}" for k, v in args.items()) or "its defaults"
    check_fits(nbytes, flag, f"the weights alone of model '{model_name}' ({shown})",
               f"give a smaller {flag}", available)


def sample_shape_of(path: Path) -> tuple[list[int], int] | None:
    """(shape of one input sample, item size) of a bundle (its manifest) or an .onnx file (its first graph
    input, batch axis dropped); None when unknown (missing, unreadable, dynamic) — the command's own loading
    then reports it."""
    import json

    path = Path(path)
    try:
        if path.is_dir():
            shape = json.loads((path / "manifest.json").read_text())["model"]["input_shape"]
            itemsize = 4
        elif path.suffix.lower() == ".onnx" and path.is_file():
            import onnx
            from onnx import helper

            proto = onnx.load(str(path), load_external_data=False)
            initialisers = {t.name for t in proto.graph.initializer}
            first = next(i for i in proto.graph.input if i.name not in initialisers)
            tensor_type = first.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim][1:]
            shape = dims
            itemsize = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        else:
            return None
    except Exception:  # noqa: BLE001 - any damage is reported by the command's own loading
        return None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return shape, itemsize


def check_artifact_batch_fits(path: Path, batches: Iterable[int], flag: str = "--batch") -> None:
    """:func:`check_batch_fits` with the sample shape of a bundle or .onnx file (unknown: not checked)."""
    known = sample_shape_of(path)
    if known is not None:
        check_batch_fits(known[0], batches, flag, itemsize=known[1])
