"""The README's examples, executed: every command in its fenced blocks runs in a fresh directory through the
installed CLI, so an example can never silently rot (parsing and running: tests/readme_examples.py).

Each example gets the inputs it names copied in from the directory of the README example that writes them
(or from a builder in ``readme_examples.PREREQS``, one line each), and the README's named files
(``# my_models.py``) it mentions or its inputs were made with. It must exit 0 — or the code in
``EXIT_CODES`` — and write what the README promises (an export's ``X.onnx``, ``X.ort.onnx``,
``X.fold.json`` and precision variant; ``compare``'s and ``report``'s ``--out`` files; a bundle's manifest
and weights; ``--json`` and ``--save-golden`` outputs; a ``triton`` repository), and print what
``PRINTS`` or a Python example's ``print(...)  # VALUE`` says. A block with shell state (the Serving and
Hugging Face sections) runs whole as one ``set -euo pipefail`` script in an empty directory, its background
jobs required to exit 0; a Python block in the same section runs inside it, while the server is up. A
command the harness cannot run must be in ``SKIPS`` with the reason; a README command in neither place, a
path nothing builds, or a table entry whose command left the README, fails.

Tiers. The default suite parses every README `lrdeploy` command with the real CLI parser
(``test_every_readme_command_parses``: flags, choices, --config files, required arguments) and checks the
tables below; executing the examples, even capped, costs ~5 minutes of a 2-core machine, past the default
suite's budget, so it runs with ``-m slow`` (capped, and verbatim).

Capped. The rot guarded against is flags, paths, outputs and exit codes, not accuracy or
speed, so the harness caps the work (``readme_examples.CAPS``, ``MODEL_CAPS``, ``PY_CAPS``); a value the
example gives is only ever lowered:

- ``lrdeploy train`` (also under ``torchrun -m lrdeploy``): ``--epochs 1 --limit-train 64 --limit-test 32``;
  a λ search (``--target-accuracy-drop``) also ``--search-trials 1``; a registry model left at its default
  size gets ``--model-arg width=8`` (resnet18, vgg19) or ``d_model=32 nhead=2 dim_feedforward=64
  num_encoder_layers=1 num_decoder_layers=1`` (transformer);
- ``lrdeploy compress`` with ``--finetune-epochs N>0``: ``--finetune-epochs 1 --limit-train 64
  --limit-test 32``;
- ``lrdeploy demo``: ``--epochs 1`` (it has no limit flags);
- measuring: ``compare`` gets ``--seconds 0.05`` and a given ``--limit-test`` lowered to 32; ``bench`` gets
  ``--seconds 0.05 --warmup 0.05 --time-limit 1``;
- Python examples: ``finetune_epochs=K`` becomes ``finetune_epochs=1, limit_train=64``.

Capped accuracy can miss a budget the full run meets: ``EXIT_CODES`` lists where capped runs may exit 1.
The examples in ``COSTLY`` (measured there) are left to ``-m slow``, still capped. In both modes
``readme_examples.SUBSTITUTIONS`` turns the placeholder ``/path/to/data`` into the data root and the Serving
script's port 8000 into a free port, and HOME is a fresh directory. ``-m slow`` also runs every example
verbatim (hours on a CPU: ResNet-18, the Transformer, a λ search, 20 LeNet-5 epochs, MiniLM on 4,000
sentences). ``LRDEPLOY_README_JOBS`` (default 2) examples run at once; each leaves ``<dir>.log`` beside its
directory.
"""

from __future__ import annotations

import os
import re

import pytest

from tests import readme_examples as rx

TEXT = rx.readme_text()
EXAMPLES = rx.examples(TEXT)

# README commands that cannot run here: a substring of the command -> why. Each must still be in the README.
SKIPS = {
    "make demo": "sets up the repository's own .venv and runs `lrdeploy demo --force`, which runs here",
    "make test": "the test suite itself",
    "--device cuda": "needs a CUDA GPU (none on CI)",
    "--trt": "needs TensorRT and an NVIDIA GPU (none on CI)",
    "--rdzv-endpoint HOST0": "several machines: a rendezvous host that every node reaches",
}

# Examples the default suite leaves to `-m slow` (still capped there) for their cost alone: a substring of
# the example -> what it costs capped (serial, on the 2-core machine, nothing else running) and why.
COSTLY = {
    "export LRDEPLOY_DATA": "167 s (219 s CPU): MiniLM's whitened SVD and distillation, an int8 export, "
                            "and a compare that exports the dense encoder on the fly (dynamo)",
    "lrdeploy demo": "51 s (81 s CPU): `demo` has no --limit-train/--limit-test, so two MLP trainings on "
                     "all of MNIST, two exports and a compare",
    "lrdeploy.save_bundle(": "29 s (42 s CPU): two exports, a fine-tune and a compare through the Python API",
}

# Commands (also inside scripts) whose exit code may be other than 0: a substring of the command ->
# (accepted codes capped, accepted codes verbatim, why: the README's words for a code it gives — they must
# still be in the README — or why capping changes it).
EXIT_CODES = {
    "lrdeploy bench dense.onnx lowrank.onnx": (
        (1,), (1,), "`bench --gate` exits 1 when the gate is missed (LeNet-5 is too small to reach 1.5×"),
    "lrdeploy demo": (
        (0, 1), (0,), "capped to one epoch, the demo may miss its accuracy budget (exit 1)"),
    "lrdeploy compare runs/minilm runs/minilm-lr50.onnx": (
        (0, 1), (0,), "capped, 64 sentences of distillation may miss the 5-point cosine budget (exit 1)"),
}

# What an example must print (beyond exit code and files): a substring of it -> a substring of its stdout.
# A Python example's `print(...)  # VALUE` line adds VALUE here by itself.
PRINTS = {
    "lrdeploy models": "transformer",
}


def _skip_reason(example: rx.Example) -> str | None:
    for key, reason in SKIPS.items():
        if any(key in c for c in example.commands):
            return reason
    return None


RUN = [e for e in EXAMPLES if _skip_reason(e) is None]


def _costly(example: rx.Example) -> bool:
    return any(key in example.text for key in COSTLY)


# Executing the examples costs ~5 minutes of a 2-core machine even capped, more than the default suite's
# budget allows: they run with -m slow; the default suite parses every command
# (test_every_readme_command_parses).
CAPPED = [pytest.param(e, id=e.id, marks=[pytest.mark.slow]) for e in RUN]


def _expected_codes(command: str, capped: bool) -> tuple[int, ...]:
    for key, (capped_codes, verbatim_codes, _) in EXIT_CODES.items():
        if key in command:
            return capped_codes if capped else verbatim_codes
    return (0,)


def _expected_prints(example: rx.Example) -> list[str]:
    out = [want for key, want in PRINTS.items() if key in example.text]
    for source in (example.text if example.kind == "python" else "", example.inserted or ""):
        out += [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+)$", source, re.M)]
    return out


# ------------------------------------------------------------------------------------------ the tables


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    unrunnable = []
    for example in EXAMPLES:
        if example.kind != "command" or _skip_reason(example):
            continue
        if rx.program(rx.stages(example.text)[0]) not in rx.PROGRAMS:
            unrunnable.append(f"README line {example.line}: {example.text}")
    assert not unrunnable, ("README commands the harness cannot run: teach tests/readme_examples.py to run "
                            "them, or list them in SKIPS with the reason:\n" + "\n".join(unrunnable))


def test_every_skip_and_exit_code_is_still_in_the_readme():
    commands = [c for e in EXAMPLES for c in e.commands]
    gone = [key for key in [*SKIPS, *EXIT_CODES, *PRINTS] if not any(key in c for c in commands)]
    gone += [key for key in COSTLY if not any(key in e.text for e in EXAMPLES)]
    assert not gone, f"listed in tests/test_readme.py but no longer a README command: {gone}"
    prose = " ".join(TEXT.split())
    for key, (_, verbatim_codes, words) in EXIT_CODES.items():
        if verbatim_codes != (0,):  # a code the README gives: its words must still be there
            assert " ".join(words.split()) in prose, f"the README no longer says {words!r} ({key})"


def test_every_path_an_example_reads_has_a_builder(tmp_path):
    harness = rx.Harness(TEXT, tmp_path, tmp_path, capped=True)
    try:
        missing = {e.id: harness.unbuildable(e) for e in RUN}
    finally:
        harness.close()
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"add a line to readme_examples.PREREQS for each: {missing}"


def test_every_readme_command_parses(tmp_path, monkeypatch):
    """Each README `lrdeploy` command, through the real CLI's parser (every flag, choice, --config file and
    required argument checked, callbacks run), without running it: fast enough for every commit."""
    import typer
    import typer.main

    from lrdeploy.cli import app
    from lrdeploy.cli_checks import click_exceptions

    for name, body in rx.files(TEXT).items():  # run.toml, my_models.py: what --config and --model read
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    group = typer.main.get_command(app)
    checked, refused = 0, []
    for example in EXAMPLES:
        for command in example.commands:
            for stage in rx.stages(command):
                argv = rx.lrdeploy_argv(rx.substitute(stage, {"data": str(tmp_path), "port": "8000"}))
                if argv is None or "$" in stage:
                    continue
                try:
                    root = group.make_context("lrdeploy", list(argv), resilient_parsing=False)
                    rest = [*root._protected_args, *root.args]
                    if rest:
                        _, sub, args = group.resolve_command(root, rest)
                        sub.make_context(rest[0], args, parent=root)
                    checked += 1
                except typer.Exit as e:  # --version, -h: eager options that end the command
                    checked += e.exit_code == 0
                    if e.exit_code:
                        refused.append(f"README line {example.line}: {stage} (exit {e.exit_code})")
                except click_exceptions.ClickException as e:
                    refused.append(f"README line {example.line}: {stage}: {e.format_message()}")
    assert not refused, "README commands the CLI refuses:\n" + "\n".join(refused)
    assert checked >= 40, checked


# ------------------------------------------------------------------------------------------ the parser


def test_commands_are_split_as_bash_splits_them():
    body = ("lrdeploy a --x 1   # a comment with 'quote\n"
            "                  # a comment-only line under it\n"
            "lrdeploy b --gate \"s>=1.5 # not a comment\" \\\n"
            "    --out o   # comment after a continuation\n"
            "\n"
            "# a whole-line comment\n"
            "lrdeploy c x#y | python -c \"import sys; print('#', sys.stdin.read())\"\n")
    assert rx.split_commands(body, 10) == [
        (10, "lrdeploy a --x 1"),
        (12, 'lrdeploy b --gate "s>=1.5 # not a comment" --out o'),
        (16, "lrdeploy c x#y | python -c \"import sys; print('#', sys.stdin.read())\""),
    ]
    assert rx.stages("lrdeploy bench a.onnx --json - | python -c 'print(1|2)'") == [
        "lrdeploy bench a.onnx --json -", "python -c 'print(1|2)'"]


def test_named_blocks_are_files_and_stateful_blocks_are_scripts():
    text = ("## S\n```toml\n# run.toml\nepochs = 1\n```\n```bash\nlrdeploy train --config run.toml\n```\n"
            "## T\n```\nexport X=1\nlrdeploy models\n```\n```python\nprint(2)   # 2\n```\n")
    assert rx.files(text) == {"run.toml": "# run.toml\nepochs = 1\n"}
    found = rx.examples(text)
    assert [(e.kind, e.line) for e in found] == [("command", 7), ("script", 11)]
    assert found[1].inserted == "print(2)   # 2\n"
    assert rx.mentioned_files(found[0].text, rx.files(text)) == ["run.toml"]
    assert rx.mentioned_files("lrdeploy train --model my_models:build", {"my_models.py": ""}) == [
        "my_models.py"]


def test_capping_rewrites_only_the_training_work():
    assert rx.cap_command("lrdeploy train --model m --epochs 20 --out runs/x") == (
        "lrdeploy train --model m --epochs 1 --out runs/x --limit-train 64 --limit-test 32")
    assert rx.cap_command("lrdeploy compress r --finetune-epochs 2 --limit-train 16 --out o") == (
        "lrdeploy compress r --finetune-epochs 1 --limit-train 16 --out o --limit-test 32")
    assert rx.cap_command("lrdeploy compress r --rank-ratio 0.5 --out o") == (
        "lrdeploy compress r --rank-ratio 0.5 --out o")
    assert "--search-trials 1" in rx.cap_command("lrdeploy train --target-accuracy-drop 1.0 --out o")
    assert rx.cap_command("torchrun --nproc-per-node 2 -m lrdeploy train --out o").endswith(
        "--out o --epochs 1 --limit-train 64 --limit-test 32")
    assert rx.cap_python("c(finetune_epochs=3)") == "c(finetune_epochs=1, limit_train=64)"
    assert rx.cap_command("lrdeploy compare a b --limit-test 1000") == (
        "lrdeploy compare a b --limit-test 32 --seconds 0.05")
    assert rx.cap_command("lrdeploy bench a b --json - | python -c 'x'") == (
        "lrdeploy bench a b --json - --seconds 0.05 --warmup 0.05 --time-limit 1 | python -c 'x'")


def test_outputs_and_inputs_are_read_from_the_command():
    assert rx.promised_outputs("lrdeploy export runs/l --out l.onnx --precision int8") == [
        "l.onnx", "l.fold.json", "l.ort.onnx", "l.int8.onnx"]
    assert rx.promised_outputs("lrdeploy compare a b.onnx --save-golden golden/") == ["golden"]
    assert "runs/long.checkpoint" in rx.named_paths("lrdeploy train --model m --out runs/long --resume")
    assert rx.promised_outputs("python -c \"import torch; torch.save(m, 'w.pt')\"") == ["w.pt"]
    assert rx.inputs_of("lrdeploy rerun runs/dense --out runs/again") == ["runs/dense"]
    assert rx.program("LRDEPLOY_DEBUG=1 lrdeploy check x.onnx") == "lrdeploy"
    assert not rx.STATEFUL.search("LRDEPLOY_DEBUG=1 lrdeploy check x.onnx")
    assert rx.STATEFUL.search('M=$(python -c "print(1)")') and rx.STATEFUL.search("X=1")


# ------------------------------------------------------------------------------------------ the examples


def _harness(request, tmp_path_factory, data_dir, *, capped: bool) -> rx.Harness:
    jobs = int(os.environ.get("LRDEPLOY_README_JOBS", "2"))
    harness = rx.Harness(TEXT, tmp_path_factory.mktemp("readme-capped" if capped else "readme-verbatim"),
                         data_dir, capped=capped, jobs=jobs, timeout=600 if capped else 4 * 3600,
                         codes=lambda command: _expected_codes(command, capped))
    request.addfinalizer(harness.close)
    wanted = "test_readme_example" if capped else "test_readme_example_verbatim"
    selected = [item.callspec.params["example"] for item in request.session.items
                if getattr(item, "originalname", None) == wanted and hasattr(item, "callspec")]
    harness.schedule(selected)  # everything selected starts now, two at a time, producers first
    return harness


@pytest.fixture(scope="module")
def capped(request, tmp_path_factory, data_dir) -> rx.Harness:
    return _harness(request, tmp_path_factory, data_dir, capped=True)


@pytest.fixture(scope="module")
def verbatim(request, tmp_path_factory, data_dir) -> rx.Harness:
    return _harness(request, tmp_path_factory, data_dir, capped=False)


def _check(harness: rx.Harness, example: rx.Example) -> None:
    result = harness.result(example)
    codes = harness.expected(example)
    assert result.rc in codes, f"exit {result.rc}, expected {codes}:\n{result.describe()}"
    missing = [p for c in example.commands for p in rx.promised_outputs(c) if not (result.cwd / p).exists()]
    assert not missing, f"the README promises {missing}, not written:\n{result.describe()}"
    for want in _expected_prints(example):
        assert want in result.stdout, f"{want!r} not printed:\n{result.describe()}"


@pytest.mark.parametrize("example", CAPPED)
def test_readme_example(example: rx.Example, capped: rx.Harness):
    _check(capped, example)


@pytest.mark.slow
@pytest.mark.parametrize("example", RUN, ids=[e.id for e in RUN])
def test_readme_example_verbatim(example: rx.Example, verbatim: rx.Harness):
    _check(verbatim, example)
