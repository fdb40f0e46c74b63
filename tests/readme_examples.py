"""The README's examples as data, and a runner for them (used by tests/test_readme.py).

Parsing: every fenced block of README.md is read with the heading it sits under. A block whose first line is
``# NAME`` with NAME a file name (``# my_models.py``, ``# run.toml``) is a *file*: it is written as NAME
into the directory of every example that mentions NAME (or, for a ``.py`` file, its module name), and of
every example that reads something such an example wrote (a bundle of ``my_models:build`` imports it). A
``bash``/``sh``/``console`` block, or one with no language, holds *commands*, split the way bash splits them:
``\\``-newline joins lines, a ``#`` that starts a word outside quotes starts a comment (so comment-only lines
indented under a command are dropped), and each remaining line is one command. A command block with shell
state (``export``, ``VAR=…``, a background ``&``, ``kill %N``, ``cd``, ``wait``) is one *script*: its lines
depend on each other and it runs whole, in an empty directory. Any other unnamed block (``python``) is a
*python* example; one in the same section as a script runs inside that script, while the script's
background server is up (just before its first ``kill %N``).

Running: each example runs in a fresh directory of its own, through bash (so pipes work) with the venv's
bin first on PATH (``lrdeploy``, ``python``, ``torchrun`` are the installed ones) and ``LRDEPLOY_DATA`` set.
The paths an example reads are found in its text: a path that another README example writes (``--out``,
``--save-golden``, ``--json``, ``--repo``, an export's family, ``torch.save(..., 'x.pt')``) is copied from
that example's directory after it has run; a path nobody in the README writes needs one line in
:data:`PREREQS`. Every example, and every builder, runs at most once per session.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin: lrdeploy, python, torchrun
KILLER = Path(__file__).resolve().parent / "train_killer.py"

COMMAND_LANGS = {"", "bash", "sh", "shell", "console"}
PROGRAMS = {"lrdeploy", "python", "torchrun"}  # what a command example may start with and be run here
FILE_NAME = re.compile(r"#\s+([\w.-]+\.[A-Za-z0-9]+)\s*$")
# a line that changes the shell's state (`VAR=value cmd` only sets cmd's environment: not state)
STATEFUL = re.compile(r"^(export\s|cd\s|wait\b|kill\s+%|[A-Za-z_]\w*=(\$\(|\S*$))|&\s*$")
ENV_PREFIX = re.compile(r"^[A-Za-z_]\w*=")

# --- what the harness changes in capped mode (the default suite): the work, never what a flag means ---
CAP_TRAIN, CAP_TEST = 64, 32  # examples trained on / evaluated on
# (subcommand, applies when, flag, value, add it when absent): a value the example gives is only lowered.
CAPS: list[tuple[str, Callable[[list[str]], bool], str, float, bool]] = [
    ("train", lambda argv: True, "--epochs", 1, True),
    ("train", lambda argv: True, "--limit-train", CAP_TRAIN, True),
    ("train", lambda argv: True, "--limit-test", CAP_TEST, True),
    ("train", lambda argv: "--target-accuracy-drop" in argv, "--search-trials", 1, True),  # a λ search
    ("compress", lambda argv: float(_flag(argv, "--finetune-epochs") or 0) > 0, "--finetune-epochs", 1, True),
    ("compress", lambda argv: float(_flag(argv, "--finetune-epochs") or 0) > 0, "--limit-train", CAP_TRAIN,
     True),
    ("compress", lambda argv: float(_flag(argv, "--finetune-epochs") or 0) > 0, "--limit-test", CAP_TEST,
     True),
    ("demo", lambda argv: True, "--epochs", 1, True),

    # measuring: one short timing window, and (where the example limits it) a small evaluation
    ("compare", lambda argv: True, "--seconds", 0.05, True),
    ("compare", lambda argv: True, "--limit-test", CAP_TEST, False),
    ("bench", lambda argv: True, "--seconds", 0.05, True),
    ("bench", lambda argv: True, "--warmup", 0.05, True),
    ("bench", lambda argv: True, "--time-limit", 1, True),
]
# `train` of a registry model at its default size: the same architecture, smaller (model argument -> value,
# added where the example does not set it)
MODEL_CAPS = {
    "resnet18": {"width": 8},
    "vgg19": {"width": 8},
    "transformer": {"d_model": 32, "nhead": 2, "dim_feedforward": 64, "num_encoder_layers": 1,
                    "num_decoder_layers": 1},
}
# Python examples: (regex, replacement)
PY_CAPS = [
    (r"\bfinetune_epochs=\d+", f"finetune_epochs=1, limit_train={CAP_TRAIN}"),
]

# README placeholders and fixed resources, replaced in every example before it runs (regex -> value; the
# value may name {data} and {port}: the data root, and a port that was free a moment ago).
SUBSTITUTIONS = {
    r"/path/to/data": "{data}",  # the HF section's `export LRDEPLOY_DATA=/path/to/data`
    r"(?<=:)8000\b|(?<=--port )8000\b": "{port}",  # Serving: port 8000 may be taken on a shared machine
}

# Paths an example reads that no README example writes: path -> how to build it (one line each). A string
# is a command (run like an example, in its own directory, capped in capped mode); INTERRUPTED_RUN is the
# reading example itself without --resume, SIGKILLed right after it installed its first checkpoint.
INTERRUPTED_RUN = "interrupted-run"
PREREQS: dict[str, str] = {
    "runs/long.checkpoint": INTERRUPTED_RUN,  # `train ... --out runs/long --resume` continues a killed run
}


@dataclass(frozen=True)
class Block:
    lang: str
    body: str  # dedented, without the fences
    line: int  # README line of the body's first line
    section: str  # the `## ` heading above it

    @property
    def name(self) -> str | None:
        """NAME when the block's first line is `# NAME` and NAME is a file name: the block is that file."""
        first = self.body.split("\n", 1)[0]
        match = FILE_NAME.fullmatch(first.strip())
        return match.group(1) if match else None


@dataclass(frozen=True)
class Example:
    kind: str  # "command", "script" or "python"
    text: str  # one command (continuations joined, comments stripped), a script's commands, python source
    line: int
    section: str
    lines: tuple[int, ...] = ()  # a script's commands' lines
    inserted: str | None = None  # python source run inside the script before its first `kill %N`

    @property
    def id(self) -> str:
        short = " ".join(self.text.split())
        if self.kind != "command":
            short = f"{self.kind}: {self.section}"
        return f"L{self.line} {short[:70]}"

    @property
    def commands(self) -> list[str]:
        if self.kind == "script":
            return self.text.split("\n")
        return [self.text] if self.kind == "command" else []


# ------------------------------------------------------------------------------------------ parsing


def blocks(text: str) -> list[Block]:
    """Every fenced block, dedented by its fence's indentation."""
    out, section, lines = [], "", text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", line)
        if fence:
            indent, lang = len(fence.group(1)), fence.group(2)
            body, j = [], i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                body.append(lines[j][indent:] if not lines[j][:indent].strip() else lines[j].lstrip())
                j += 1
            out.append(Block(lang, "\n".join(body), i + 2, section))
            i = j
        i += 1
    return out


def split_commands(body: str, first_line: int = 1) -> list[tuple[int, str]]:
    """(line, command) for each command of a shell block, as bash would split it: quotes respected,
    backslash-newline joined, `#` at the start of a word (outside quotes) to the end of the line dropped."""
    commands: list[tuple[int, str]] = []
    current: list[str] = []
    start, line, quote, i = first_line, first_line, None, 0
    word_start = True

    def finish() -> None:
        text = re.sub(r"[ \t]+", " ", "".join(current)).strip()
        if text:
            commands.append((start, text))
        current.clear()

    while i < len(body):
        ch = body[i]
        if quote == "'":
            current.append(ch)
            quote = None if ch == "'" else quote
        elif quote == '"':
            current.append(ch)
            if ch == "\\" and i + 1 < len(body):
                i += 1
                current.append(body[i])
                line += body[i] == "\n"
            elif ch == '"':
                quote = None
            else:
                line += ch == "\n"
        elif ch == "\\" and body[i + 1: i + 2] == "\n":
            i += 1
            line += 1
            current.append(" ")
            word_start = True
        elif ch == "\\" and i + 1 < len(body):
            current.append(body[i: i + 2])
            i += 1
            word_start = False
        elif ch == "#" and word_start:
            while i < len(body) and body[i] != "\n":
                i += 1
            continue
        elif ch == "\n":
            finish()
            line += 1
            start = line
            word_start = True
        else:
            if ch in "'\"":
                quote = ch
            if not "".join(current).strip():
                start = line
            current.append(ch)
            word_start = ch in " \t;|&()"
        i += 1
    finish()
    return commands


def files(text: str) -> dict[str, str]:
    """The README's named blocks: file name -> content."""
    named = {b.name: b.body + "\n" for b in blocks(text) if b.name}
    return named


def examples(text: str) -> list[Example]:
    found: list[Example] = []
    pythons: list[tuple[Block, str]] = []
    for block in blocks(text):
        if block.name:
            continue
        if block.lang in COMMAND_LANGS:
            commands = split_commands(block.body, block.line)
            if any(STATEFUL.search(c) for _, c in commands):
                found.append(Example("script", "\n".join(c for _, c in commands), block.line, block.section,
                                     tuple(n for n, _ in commands)))
            else:
                found.extend(Example("command", c, n, block.section) for n, c in commands)
        else:
            pythons.append((block, block.body))
    for block, source in pythons:
        hosts = [i for i, e in enumerate(found) if e.kind == "script" and e.section == block.section]
        if hosts:
            host = found[hosts[0]]
            found[hosts[0]] = Example(host.kind, host.text, host.line, host.section, host.lines,
                                      (host.inserted or "") + source + "\n")
        else:
            found.append(Example("python", source, block.line, block.section))
    return sorted(found, key=lambda e: e.line)


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ paths


def stages(command: str) -> list[str]:
    """The pipeline/list stages of one command (split on |, &&, ||, ; outside quotes)."""
    out, current, quote, i = [], [], None, 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "|;&":
            out.append("".join(current).strip())
            current = []
            while i + 1 < len(command) and command[i + 1] in "|&":
                i += 1
            i += 1
            continue
        current.append(ch)
        i += 1
    out.append("".join(current).strip())
    return [s for s in out if s]


def words(stage: str) -> list[str]:
    try:
        return shlex.split(stage)
    except ValueError:
        return stage.split()


def program(stage: str) -> str | None:
    """The program a stage runs (after any `VAR=value` environment prefix)."""
    argv = words(stage)
    while argv and ENV_PREFIX.match(argv[0]):
        argv.pop(0)
    return argv[0] if argv else None


def lrdeploy_argv(stage: str) -> list[str] | None:
    """The arguments after `lrdeploy` (also `torchrun ... -m lrdeploy`), or None for another program."""
    argv = words(stage)
    while argv and ENV_PREFIX.match(argv[0]):
        argv.pop(0)
    if argv and argv[0] == "lrdeploy":
        return argv[1:]
    if argv and argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        if argv[i + 1: i + 2] == ["lrdeploy"]:
            return argv[i + 2:]
    return None


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _norm(path: str) -> str:
    return path.rstrip("/") if path not in ("/", "") else path


def promised_outputs(command: str) -> list[str]:
    """What the README says a command writes (relative paths; a directory's files as dir/name)."""
    out: list[str] = []
    for stage in stages(command):
        argv = lrdeploy_argv(stage)
        if argv is None:
            out += [m.group(2) for m in re.finditer(r"torch\.save\(.*?,\s*(['\"])([^'\"]+)\1\s*\)", stage)]
            continue
        if not argv:
            continue
        sub, target = argv[0], _flag(argv, "--out")
        if sub in ("train", "compress", "init", "rerun") and target:
            out += [f"{_norm(target)}/manifest.json", f"{_norm(target)}/weights.safetensors"]
        elif sub == "export" and target and "--trt" not in argv:
            stem = target[: -len(".onnx")] if target.endswith(".onnx") else target
            out += [target, f"{stem}.fold.json"]
            if _flag(argv, "--optimize") != "none":
                out.append(f"{stem}.ort.onnx")
            if _flag(argv, "--precision") in ("fp16", "bf16", "int8"):
                out.append(f"{stem}.{_flag(argv, '--precision')}.onnx")
        elif sub == "compare" and target:
            out += [f"{_norm(target)}/{n}" for n in ("report.json", "report.md", "plot.png")]
        elif sub == "report" and target:
            out += [f"{_norm(target)}/{n}" for n in ("summary.json", "report.md", "plot.png")]
        elif sub == "demo":
            out += [f"{_norm(target or 'runs/demo')}/{n}" for n in ("report.json", "report.md", "plot.png")]
        elif sub == "triton":
            repo = _flag(argv, "--repo")
            models = [a for a in argv[1:] if a.endswith((".onnx", ".plan"))]
            names = (_flag(argv, "--names") or "").split(",") if _flag(argv, "--names") else [
                Path(m).name.split(".")[0] for m in models]
            for name in names if repo else []:
                out += [f"{_norm(repo)}/{name}/config.pbtxt", f"{_norm(repo)}/{name}/1/model.onnx"]
        elif target and sub not in ("train", "compress", "init", "export", "compare", "report"):
            out.append(_norm(target))
        golden = _flag(argv, "--save-golden")
        if golden:
            out.append(_norm(golden))
        json_out = _flag(argv, "--json")
        if json_out and json_out != "-":
            out.append(json_out)
    return out


def produced_paths(command: str) -> list[str]:
    """Paths a command writes that another example may read: its outputs and the directories holding them."""
    out = []
    for stage in stages(command):
        argv = lrdeploy_argv(stage) or []
        for flag in ("--out", "--save-golden", "--repo"):
            value = _flag(argv, flag)
            if value:
                out.append(_norm(value))
    for path in promised_outputs(command):
        out.append(path)
    return list(dict.fromkeys(out))


PATHLIKE = re.compile(r"^[\w.-]+(/[\w.-]*)*$")
FILE_SUFFIX = re.compile(r"\.[A-Za-z]\w*$")  # x.onnx, my.pt — not 0.25


def named_paths(command: str) -> list[str]:
    """Every word of a command (and string literal in its Python) that could name a local path."""
    found: list[str] = []
    for stage in stages(command):
        for word in words(stage):
            found.append(word)
            found += [m.group(2) for m in re.finditer(r"(['\"])([^'\"\s]+)\1", word)]
        argv = lrdeploy_argv(stage)
        if argv and argv[0] == "train" and "--resume" in argv and _flag(argv, "--out"):
            found.append(_flag(argv, "--checkpoint-dir") or _norm(_flag(argv, "--out")) + ".checkpoint/")
    paths = [_norm(p) for p in found if PATHLIKE.match(p) and ("/" in p or FILE_SUFFIX.search(p))]
    return list(dict.fromkeys(paths))


def inputs_of(command: str) -> list[str]:
    """The paths a command names that it does not write itself: what it reads."""
    own = set(produced_paths(command))
    return [p for p in named_paths(command) if p not in own]


def mentioned_files(text: str, named: dict[str, str]) -> list[str]:
    """The README's named files an example uses: it names the file, or (a .py file) its module."""
    out = []
    for name in named:
        stem = name[: -len(".py")] if name.endswith(".py") else None
        if name in text or (stem and re.search(rf"(?<![\w.]){re.escape(stem)}\b", text)):
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------ capping


def _arg(argv: list[str], key: str) -> bool:
    """Whether the command sets model argument ``key`` (--model-arg key=value)."""
    return any(a.startswith(f"{key}=") for i, a in enumerate(argv) if i and argv[i - 1] == "--model-arg")


def _append(stage: str, words: str) -> str:
    """``words`` added at the end of a stage (before a trailing `&`)."""
    tail = re.search(r"\s*&?\s*$", stage)
    cut = tail.start() if tail else len(stage)
    return f"{stage[:cut]} {words}{stage[cut:]}"


def _set(stage: str, flag: str, value: float, add: bool) -> str:
    match = re.search(rf"(?<!\S){re.escape(flag)}(=|\s+)(\d+(\.\d*)?)", stage)
    shown = f"{value:g}"
    if match:
        if float(match.group(2)) <= value:
            return stage
        return stage[: match.start(2)] + shown + stage[match.end(2):]
    return _append(stage, f"{flag} {shown}") if add else stage


def cap_command(command: str) -> str:
    """The command with its work capped by CAPS (see tests/test_readme.py's docstring)."""
    out = command
    for stage in stages(command):
        argv = lrdeploy_argv(stage)
        if not argv:
            continue
        new = stage
        for sub, applies, flag, value, add in CAPS:
            if argv[0] == sub and applies(argv):
                new = _set(new, flag, value, add)
        if argv[0] == "train":
            for key, value in MODEL_CAPS.get(_flag(argv, "--model") or "", {}).items():
                if not _arg(argv, key):
                    new = _append(new, f"--model-arg {key}={value}")
        out = out.replace(stage, new, 1)
    return out


def cap_python(source: str) -> str:
    """Python examples, capped by PY_CAPS."""
    for pattern, replacement in PY_CAPS:
        source = re.sub(pattern, replacement, source)
    return source


def substitute(text: str, values: dict[str, str]) -> str:
    for pattern, value in SUBSTITUTIONS.items():
        text = re.sub(pattern, value.format(**values), text)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ running


@dataclass
class Result:
    name: str
    cwd: Path
    rc: int | None  # None: not run (a prerequisite failed)
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    script: str = ""
    note: str = ""

    def describe(self, tail: int = 3000) -> str:
        return (f"{self.name}\n  in {self.cwd}\n  ran: {self.script.strip()[:1500]}\n  exit {self.rc} after "
                f"{self.seconds:.1f} s {self.note}\n--- stdout (tail)\n{self.stdout[-tail:]}\n"
                f"--- stderr (tail)\n{self.stderr[-tail:]}")


@dataclass
class Task:
    name: str
    script: str  # bash source, run in its own directory
    needs: list[str]  # paths copied in from their producers
    files: list[str]  # README named files written in
    inserted: str | None = None  # python source written beside (a script example's client block)
    future: Future | None = field(default=None, repr=False)


class Harness:
    """Runs README examples (and the builders of what they read), each once, in fresh directories."""

    def __init__(self, text: str, root: Path, data: Path, *, capped: bool, jobs: int = 2,
                 timeout: float | None = None,
                 codes: Callable[[str], tuple[int, ...]] = lambda command: (0,)) -> None:
        """``codes(command)``: the exit codes a README command may end with (as the README says)."""
        self.text, self.root, self.data, self.capped, self.codes = text, root, data, capped, codes
        self.timeout = timeout
        self.named = files(text)
        self.examples = examples(text)
        self.values = {"data": str(data), "port": str(free_port())}
        self.producers: dict[str, Example] = {}
        for example in self.examples:
            for command in example.commands:
                for path in produced_paths(command):
                    self.producers.setdefault(path, example)
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.tasks: dict[str, Task] = {}
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="readme")
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()

    # -- what runs

    def prepared(self, example: Example) -> str:
        """The bash source an example runs as (capped in capped mode, substitutions applied)."""
        if example.kind == "python":
            return f"python {self._py_name(example)}"
        commands = [cap_command(c) if self.capped else c for c in example.commands]
        if example.kind == "command":
            return substitute("set -o pipefail\n" + commands[0], self.values)
        body = [self._checked(c, self.codes(original))
                for c, original in zip(commands, example.commands, strict=True)]
        if example.inserted:
            kills = [i for i, c in enumerate(body) if re.match(r"kill\s+%", c)]
            at = kills[0] if kills else len(body)
            body.insert(at, f"python {self._py_name(example)}")
        script = "\n".join(["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
                             "PS4='+ [${SECONDS}s] '", "set -x", *body])
        if any(re.search(r"&\s*$", c) for c in commands):  # each background job must have exited 0
            script += "\nfor job in $(jobs -p); do wait $job; done\nwait\n"
        return substitute(script, self.values)

    @staticmethod
    def _checked(command: str, codes: tuple[int, ...]) -> str:
        """A script line that may also end with another code than 0 (under `set -e`)."""
        if codes == (0,) or re.search(r"&\s*$", command):
            return command
        accepted = " ".join(map(str, codes))
        return f'{command} || {{ rc=$?; [[ " {accepted} " == *" $rc "* ]] || exit $rc; }}'

    def _py_name(self, example: Example) -> str:
        return f"readme_L{example.line}.py"

    def _python(self, example: Example) -> str | None:
        source = example.text if example.kind == "python" else example.inserted
        if source is None:
            return None
        return substitute(cap_python(source) if self.capped else source, self.values)

    def inputs(self, example: Example) -> list[str]:
        own = {p for c in example.commands for p in produced_paths(c)}
        text = example.text + "\n" + (example.inserted or "")
        candidates = [p for c in (example.commands or [text]) for p in named_paths(c)]
        if example.kind == "python":
            candidates = [_norm(m.group(2)) for m in re.finditer(r"(['\"])([^'\"\s]+)\1", text)]
        needs = []
        for path in dict.fromkeys(candidates):
            if path in own or path in self.named:
                continue
            if path in PREREQS or (path in self.producers and self.producers[path] is not example):
                needs.append(path)
        return needs

    def unbuildable(self, example: Example) -> list[str]:
        """Paths an example names that nothing builds: neither its own outputs, a README file, a README
        example's output nor a PREREQS entry (a script builds its own)."""
        if example.kind != "command":
            return []
        return [p for p in inputs_of(example.text)
                if p not in self.named and p not in PREREQS and p not in self.producers]

    # -- scheduling

    def task_for(self, example: Example) -> Task:
        key = f"example:{example.line}"
        if key not in self.tasks:
            self.tasks[key] = Task(example.id, self.prepared(example), self.inputs(example),
                                   mentioned_files(example.text + (example.inserted or ""), self.named),
                                   self._python(example))
        return self.tasks[key]

    def task_for_path(self, path: str, reader: Example) -> tuple[str, Task]:
        builder = PREREQS.get(path)
        if builder is None:
            return f"example:{self.producers[path].line}", self.task_for(self.producers[path])
        key = f"build:{path}"
        if key not in self.tasks:
            if builder == INTERRUPTED_RUN:
                command = re.sub(r"\s--resume\b", "", reader.text)
                command = cap_command(command) if self.capped else command
                point = f"installed:{Path(path).name}:1"
                if not command.startswith("lrdeploy train "):
                    raise ValueError(f"{INTERRUPTED_RUN} builds from `lrdeploy train ...`, not {command!r}")
                killed = f"python {shlex.quote(str(KILLER))} write={point}" + command[len("lrdeploy"):]
                script = substitute(f"{killed}\ntest $? -ne 0  # it must have been killed", self.values)
                script = f"set +e\n{script}"
                needs = [p for p in named_paths(command) if p in PREREQS or p in self.producers]
                needs = [p for p in needs if p != path and p not in produced_paths(command)]
            else:
                script = cap_command(builder) if self.capped else builder
                script = substitute("set -o pipefail\n" + script, self.values)
                needs = [p for p in named_paths(builder) if p != path
                         and (p in PREREQS or p in self.producers) and p not in produced_paths(builder)]
            self.tasks[key] = Task(f"prerequisite {path}", script, needs,
                                   mentioned_files(builder if builder != INTERRUPTED_RUN else reader.text,
                                                   self.named))
        return key, self.tasks[key]

    def schedule(self, selected: list[Example]) -> None:
        """Submit the selected examples and everything they need, producers first."""
        order: list[tuple[str, Task, dict[str, str]]] = []
        seen: set[str] = set()

        def visit(key: str, task: Task, reader: Example | None) -> None:
            if key in seen:
                return
            seen.add(key)
            sources: dict[str, str] = {}
            for path in task.needs:
                dep_key, dep = self.task_for_path(path, reader)
                visit(dep_key, dep, self._example(dep_key) or reader)
                sources[path] = dep_key
                # a bundle of `--model my_models:build` needs my_models.py wherever it goes
                task.files = list(dict.fromkeys([*task.files, *dep.files]))
            order.append((key, task, sources))

        for example in selected:
            visit(f"example:{example.line}", self.task_for(example), example)
        for key, task, sources in order:
            if task.future is None:
                task.future = self.pool.submit(self._run_task, key, task, sources)

    def _example(self, key: str) -> Example | None:
        if not key.startswith("example:"):
            return None
        line = int(key.split(":", 1)[1])
        return next(e for e in self.examples if e.line == line)

    def result(self, example: Example) -> Result:
        task = self.task_for(example)
        if task.future is None:
            self.schedule([example])
        assert task.future is not None
        return task.future.result()

    def _run_task(self, key: str, task: Task, sources: dict[str, str]) -> Result:
        cwd = self.root / re.sub(r"[^\w.-]+", "_", key)
        cwd.mkdir(parents=True)
        for path, dep_key in sources.items():
            dep = self.tasks[dep_key]
            assert dep.future is not None
            got = dep.future.result()
            if got.rc not in self._ok_codes(dep_key):
                return Result(task.name, cwd, None, script=task.script,
                              note=f"(not run: prerequisite {path} failed to build)\n{got.describe(1500)}")
            src = got.cwd / path
            if not src.exists():
                return Result(task.name, cwd, None, script=task.script,
                              note=f"(not run: {dep.name} did not write {path})")
            dst = cwd / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
                tokenizer = src.with_name(src.name.removesuffix(".onnx") + ".tokenizer.json")
                if src.suffix == ".onnx" and tokenizer.exists():
                    shutil.copy2(tokenizer, dst.with_name(tokenizer.name))
        for name in task.files:
            (cwd / name).write_text(self.named[name], encoding="utf-8")
        example = self._example(key)
        if task.inserted is not None and example is not None:
            (cwd / self._py_name(example)).write_text(task.inserted, encoding="utf-8")
        return self._run(task.name, task.script, cwd)

    def _ok_codes(self, key: str) -> tuple[int, ...]:
        example = self._example(key)
        return self.expected(example) if example is not None else (0,)

    def expected(self, example: Example) -> tuple[int, ...]:
        """A command's codes; a script and python exit 0 (a script checks its commands' codes itself)."""
        return self.codes(example.text) if example.kind == "command" else (0,)

    def _run(self, name: str, script: str, cwd: Path) -> Result:
        env = dict(os.environ)
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "LRDEPLOY_DATA": str(self.data),
            "PET_MASTER_PORT": str(free_port()),  # torchrun's default 29500 may be taken on a shared machine
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": str(self.home),  # e.g. `--install-completion` writes the shell's rc file under HOME
        })
        env.pop("VIRTUAL_ENV", None)
        start = time.monotonic()
        # stdin: never the xdist worker's (its channel to the controller: a child reading it kills the worker)
        proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        with self.lock:
            self.procs.add(proc)
        note = ""
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            note = f"(killed: over {self.timeout} s)"
        finally:
            with self.lock:
                self.procs.discard(proc)
        seconds = time.monotonic() - start
        log = cwd.with_name(cwd.name + ".log")  # beside the directory, so that it never becomes an input
        log.write_text(f"$ {script}\n--- exit {proc.returncode} after {seconds:.1f} s {note}\n--- stdout\n"
                       f"{stdout}\n--- stderr\n{stderr}", encoding="utf-8")
        return Result(name, cwd, proc.returncode, stdout, stderr, seconds, script, note)

    def close(self) -> None:
        with self.lock:
            for proc in list(self.procs):
                _kill_group(proc)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)

