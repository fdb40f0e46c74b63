"""The user's own model (``--model pkg.module:factory``), their own data (``.npz``, image folders) and the
Python API, end to end on real Fashion-MNIST through the real CLI, ONNX Runtime and a fresh process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lrdeploy.cli import app
from lrdeploy.errors import UserError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

NET = '''
import torch
from torch import nn


def build(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A plain conv net for 28x28 grayscale images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def declared(num_classes: int = 10) -> nn.Module:
    return build(num_classes)


declared.lrdeploy_task = "classification"
declared.lrdeploy_input_shape = (1, 28, 28)


def broken(width: int = 8) -> nn.Module:
    raise ValueError("width must be even")


def not_a_model() -> int:
    return 3


NOT_CALLABLE = 42
'''


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """A module of the user's in the working directory (as `lrdeploy` would be run beside it); a fresh
    module name per test, and sys.path / sys.modules restored afterwards."""
    name = "usernet_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(NET))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def fashion_npz(path: Path, data_dir: Path, n_train: int = 1000, n_test: int = 300) -> Path:
    """Real Fashion-MNIST images back as raw uint8 pixels (N×H×W×1, channels last) in the documented .npz."""
    from lrdeploy.data import load_dataset

    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ds = load_dataset("fashion-mnist", split, data_dir=data_dir, limit=n)
        pixels = np.rint((ds.x.numpy() * 0.3530 + 0.2860) * 255).clip(0, 255).astype(np.uint8)
        arrays[f"x_{split}"] = pixels.transpose(0, 2, 3, 1)
        arrays[f"y_{split}"] = ds.y.numpy()
    np.savez(path, **arrays, classes=np.array(ds.classes))
    return path


def test_user_module_init_compress_export_compare(user_module, data_dir, tmp_path):
    """train (1 epoch) → its weights as a plain checkpoint → init --from-checkpoint → compress → export →
    compare, all through the CLI with `--model <module>:build`; the ONNX graph computes what the bundle's
    PyTorch model computes."""
    import onnxruntime as ort
    from safetensors.torch import load_file

    from lrdeploy.bundle import load_bundle

    model = f"{user_module}:build"
    r = invoke("train", "--model", model, "--task", "classification", "--data", "fashion-mnist",
               "--data-dir", data_dir, "--limit-train", 2000, "--limit-test", 500, "--epochs", 1,
               "--batch-size", 32, "--model-arg", "width=8", "--out", "trained")
    assert r.exit_code == 0, r.output
    trained = json.loads(Path("trained/manifest.json").read_text())
    assert trained["metrics"]["test_accuracy"] > 0.5  # chance is 0.10
    torch.save(load_file("trained/weights.safetensors"), "ckpt.pt")  # a plain state dict, as users have

    r = invoke("init", "--model", model, "--task", "classification", "--input-shape", "1,28,28",
               "--model-arg", "width=8", "--from-checkpoint", "ckpt.pt", "--out", "dense")
    assert r.exit_code == 0, r.output
    manifest = json.loads(Path("dense/manifest.json").read_text())
    assert manifest["model"] == {"name": model, "args": {"num_classes": 10, "width": 8},
                                 "input_shape": [1, 28, 28], "task": "classification", "source": "import"}
    assert manifest["weights_sha256"] == trained["weights_sha256"]  # the checkpoint's weights

    r = invoke("compress", "dense", "--rank-ratio", "0.5", "--data", "fashion-mnist", "--data-dir", data_dir,
               "--finetune-epochs", 1, "--limit-train", 500, "--out", "lowrank")
    assert r.exit_code == 0, r.output
    assert f"imports Python module '{user_module}'" in r.stderr  # said plainly before importing it
    lowrank = load_bundle("lowrank")
    assert lowrank.manifest["model"]["name"] == model and lowrank.manifest["structure"]  # factorised layers

    for name in ("dense", "lowrank"):
        r = invoke("export", name, "--out", f"{name}.onnx", "--fold", "factored", "--optimize", "none")
        assert r.exit_code == 0, r.output
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession("lowrank.onnx", providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = lowrank.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    r = invoke("compare", "dense.onnx", "lowrank.onnx", "--data", "fashion-mnist", "--data-dir", data_dir,
               "--limit-test", 300, "--batch", "1", "--seconds", "0.05", "--max-accuracy-drop", "100",
               "--json", "report.json")
    assert r.exit_code == 0, r.output
    report = json.loads(Path("report.json").read_text())
    assert report["accuracy"]["samples"] == 300
    assert report["accuracy"]["reference"] > 0.5 and report["accuracy"]["candidate"] > 0.5
    assert report["candidate"]["params"] < report["reference"]["params"]


def test_user_module_flags_and_errors(user_module, tmp_path):
    """What the factory does not declare is asked for by flag; what it declares is used; every mistake in
    the module or the name is one line naming it."""
    r = invoke("init", "--model", f"{user_module}:build", "--out", "b")
    assert "--task is needed" in one_error_line(r)
    r = invoke("init", "--model", f"{user_module}:build", "--task", "classification", "--out", "b")
    assert "--input-shape is needed" in one_error_line(r)
    r = invoke("init", "--model", f"{user_module}:build", "--task", "nosuchtask", "--input-shape", "1,28,28",
               "--out", "b")
    assert "'nosuchtask' is not a known task" in one_error_line(r)
    r = invoke("init", "--model", f"{user_module}:build", "--task", "classification", "--input-shape",
               "3,32,32", "--out", "b")
    assert "cannot take one input of shape 3,32,32" in one_error_line(r)

    r = invoke("init", "--model", f"{user_module}:declared", "--out", "declared")  # task and shape declared
    assert r.exit_code == 0, r.output
    model = json.loads(Path("declared/manifest.json").read_text())["model"]
    assert (model["task"], model["input_shape"]) == ("classification", [1, 28, 28])

    cases = {
        "nomodule_xyz:build": "no module named 'nomodule_xyz'",
        f"{user_module}:buidl": "did you mean 'build'?",
        f"{user_module}:NOT_CALLABLE": "is a int, not callable",
        f"{user_module}:broken": "the factory raised ValueError: width must be even",
        f"{user_module}:not_a_model": "returned int, not a torch.nn.Module",
        "os:system": "not a model module",
    }
    for name, expected in cases.items():
        r = invoke("init", "--model", name, "--task", "classification", "--input-shape", "1,28,28",
                   "--out", "b")
        assert expected in one_error_line(r), (name, r.stderr)
    assert not Path("b").exists()


def test_bundle_of_user_module_in_fresh_process(user_module, tmp_path, monkeypatch):
    """Another process rebuilds the model from the bundle by importing the module from PYTHONPATH (saying
    so once on stderr); where the module cannot be found, a command fails with one line naming it."""
    r = invoke("init", "--model", f"{user_module}:build", "--task", "classification", "--input-shape",
               "1,28,28", "--out", "bundle")
    assert r.exit_code == 0, r.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys; from lrdeploy.bundle import load_bundle; import torch\n"
              "a = load_bundle(sys.argv[1]); b = load_bundle(sys.argv[1])\n"
              "print(a.model(torch.zeros(2, 1, 28, 28)).shape[1], type(a.model).__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bundle")], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["10", "Sequential"]
    notes = [ln for ln in proc.stderr.splitlines() if "imports Python module" in ln]
    assert len(notes) == 1 and f"'{user_module}'" in notes[0]  # once per process

    # This process, run from elsewhere, with the module neither imported nor on the path.
    sys.modules.pop(user_module, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != tmp_path.resolve()])
    monkeypatch.chdir(elsewhere)
    r = invoke("export", tmp_path / "bundle", "--out", "m.onnx")
    line = one_error_line(r)
    assert f"no module named '{user_module}'" in line and "PYTHONPATH" in line
    assert not r.stderr.startswith("note:")  # nothing was imported, so nothing to warn about
    assert not (elsewhere / "m.onnx").exists()


def test_npz_user_data_trains_and_is_checksummed(user_module, data_dir, tmp_path):
    """A user's .npz trains a user's module; the bundle records the file's sha256 and the training split's
    normalisation, later commands reuse both, and a changed file is refused."""
    from lrdeploy.bundle import load_bundle

    data = fashion_npz(tmp_path / "fm.npz", data_dir)
    r = invoke("train", "--model", f"{user_module}:declared", "--data", "fm.npz", "--epochs", 1,
               "--batch-size", 32, "--out", "npz-bundle")
    assert r.exit_code == 0, r.output
    manifest = load_bundle("npz-bundle").manifest
    record = manifest["dataset"]
    assert record["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["format"] == "npz" and record["name"] == str(data.resolve())
    pixels = np.load(data)["x_train"].astype(np.float64) / 255.0
    assert record["preprocess"]["mean"] == pytest.approx([pixels.mean()])
    assert record["preprocess"]["std"] == pytest.approx([pixels.std()])
    assert manifest["metrics"]["test_samples"] == 300
    assert manifest["metrics"]["test_accuracy"] > 0.3  # 1,000 images, one epoch; chance is 0.10

    r = invoke("compress", "npz-bundle", "--rank-ratio", "0.5", "--out", "npz-lowrank")  # its own data again
    assert r.exit_code == 0, r.output
    assert load_bundle("npz-lowrank").manifest["metrics"]["test_accuracy"] > 0.1

    arrays = dict(np.load(data))
    arrays["y_test"][0] = (arrays["y_test"][0] + 1) % 10
    np.savez(data, **arrays)
    r = invoke("compress", "npz-bundle", "--rank-ratio", "0.5", "--out", "npz-changed")
    assert "changed since the bundle was made" in one_error_line(r)


def _bad(path: Path, data_dir: Path, edit) -> Path:
    arrays = dict(np.load(fashion_npz(path, data_dir, 20, 10)))
    edit(arrays)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda a: a.pop("y_test"), "lacks the array(s) y_test"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "x_train has 20 examples but y_train has 19 labels"),
    (lambda a: a.update(x_test=a["x_test"][:, :14]), "x_test samples are uint8 (1, 14, 28)"),
    (lambda a: a.update(y_test=a["y_test"] + 10), "label(s) outside [0, 10)"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "integer labels"),
    (lambda a: a.update(x_train=np.where(np.arange(20)[:, None, None, None] == 3, np.nan,
                                         a["x_train"].transpose(0, 3, 1, 2) / 255.0),
                        x_test=a["x_test"].transpose(0, 3, 1, 2) / 255.0), "784 NaN/Inf value(s)"),
    (lambda a: a.update(classes=np.array([{"a": 1}], dtype=object)), "cannot be read without pickle"),
])
def test_bad_npz_is_one_line(edit, expected, tmp_path, data_dir):
    from lrdeploy.data.user_data import load_user_data

    path = _bad(tmp_path / "bad.npz", data_dir, edit)
    with pytest.raises(UserError) as info:
        for split in ("train", "test"):
            load_user_data(path, split).classes  # noqa: B018
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_float_npz_and_image_folder(tmp_path, data_dir):
    """Float N×C×H×W arrays are taken as they are; an image folder (real PNGs) reads to the same pixels
    as the arrays it was written from, classes from folder names, a limit spanning the classes."""
    from PIL import Image

    from lrdeploy.data.user_data import is_user_data, load_user_data

    arrays = dict(np.load(fashion_npz(tmp_path / "fm.npz", data_dir, 60, 20)))
    floats = {k: (v.transpose(0, 3, 1, 2) / 255.0).astype(np.float32) if k.startswith("x_") else v
              for k, v in arrays.items()}
    np.savez(tmp_path / "float.npz", **floats)
    a, b = load_user_data(tmp_path / "fm.npz", "test"), load_user_data(tmp_path / "float.npz", "test")
    assert a.preprocess["scale"] == pytest.approx(1 / 255) and b.preprocess["scale"] == 1.0
    np.testing.assert_allclose(a.x.numpy(), b.x.numpy(), atol=1e-5)  # the same normalised images
    assert a.classes[0] == "T-shirt/top" and b.y.tolist() == arrays["y_test"].tolist()

    root = tmp_path / "images"
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(arrays[f"x_{split}"], arrays[f"y_{split}"], strict=True)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[:, :, 0]).save(folder / f"{i:03d}.png")
    assert is_user_data(root) and is_user_data("missing/data.npz") and not is_user_data("fashion-mnist")
    folder = load_user_data(root, "train")
    present = sorted({int(y) for y in arrays["y_train"]})
    assert folder.classes == [f"c{c}" for c in present] and folder.x.shape == (60, 1, 28, 28)
    assert folder.info["format"] == "image-folder" and len(folder.info["sha256"]) == 64
    x = folder.x.numpy() * folder.preprocess["std"][0] + folder.preprocess["mean"][0]
    decoded = sorted(np.rint(x * 255).astype(np.uint8).reshape(60, -1).tolist())
    assert decoded == sorted(arrays["x_train"].reshape(60, -1).tolist())  # lossless PNG round trip
    assert len(set(load_user_data(root, "train", limit=12).y.tolist())) > 3  # not just the first classes


def test_python_api_round_trip(user_module, data_dir, tmp_path):
    """save_bundle → compress → export → compare from Python, through the commands' own code."""
    import importlib

    import lrdeploy
    from lrdeploy.compress import CompressionReport

    sys.path.insert(0, str(tmp_path))  # the notebook's folder (restored by the fixture)
    module = importlib.import_module(user_module)
    model = module.build(width=4)
    x = torch.randn(3, 1, 28, 28)
    with pytest.raises(UserError, match="pass the model_name and model_args"):  # would not load back
        lrdeploy.save_bundle(model, "api-dense", model_name=f"{user_module}:build", task="classification")
    path = lrdeploy.save_bundle(model, "api-dense", model_name=f"{user_module}:build",
                                model_args={"width": 4}, task="classification", input_shape=(1, 28, 28))
    loaded = lrdeploy.load_bundle(path)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))

    report = lrdeploy.compress(model, rank_ratio=0.5)  # a model in memory: factorised in place
    assert isinstance(report, CompressionReport) and report.compressed
    lowrank = lrdeploy.save_bundle(model, "api-lowrank", model_name=f"{user_module}:build",
                                   model_args={"width": 4}, task="classification", input_shape=(1, 28, 28))
    assert lrdeploy.load_bundle(lowrank).manifest["structure"]
    result = lrdeploy.compress("api-dense", rank_ratio=0.5, out="api-cli-lowrank", data="fashion-mnist",
                               data_dir=data_dir, progress=False)
    assert result["bundle"] == Path("api-cli-lowrank") and "test_accuracy" in result["metrics"]

    exported = lrdeploy.export(lowrank, "api.onnx", fold="factored", optimize="none")
    assert exported["passed"] and exported["onnx"].is_file()
    dense_onnx = lrdeploy.export(module.build(width=4), "dense.onnx", model_name=f"{user_module}:build",
                                 model_args={"width": 4}, task="classification", input_shape=(1, 28, 28),
                                 optimize="none")
    assert dense_onnx["onnx"].is_file()
    report = lrdeploy.compare("dense.onnx", "api.onnx", dataset="fashion-mnist", data_dir=data_dir,
                              limit_test=100, batch_sizes=[1], min_seconds=0.05, max_accuracy_drop=100)
    assert report["accuracy"]["samples"] == 100
    assert report["candidate"]["params"] < report["reference"]["params"]
