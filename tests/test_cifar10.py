"""CIFAR-10: both official layouts on the real (partial) records, verification, the restricted unpickler,
download from a tarball, and a short seeded training run with crop-flip augmentation."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from lrdeploy.data import checksum, cifar10, download_dataset, load_dataset
from lrdeploy.data.cifar10 import (
    BATCHES,
    RECORD,
    download_cifar10,
    load_cifar10,
    read_binary_batch,
    read_python_batch,
    restricted_loads,
)
from lrdeploy.errors import UserError
from lrdeploy.models import create_model
from lrdeploy.train import TrainConfig, train

FIRST_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # frog, truck, truck, deer, automobile, ... (data README)
ALL = [*BATCHES["train"], *BATCHES["test"]]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No test may see the developer's LRDEPLOY_DATA or ~/.cache, nor another test's verified-file cache."""
    monkeypatch.delenv("LRDEPLOY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    checksum.clear_cache()


@pytest.fixture(scope="module")
def bin_dir(data_dir):
    folder = data_dir / "cifar10" / "cifar-10-batches-bin"
    if not folder.is_dir():
        pytest.skip("no CIFAR-10 records in the shared data")
    return folder


def _records(bin_dir, name):
    return np.fromfile(bin_dir / f"{name}.bin", dtype=np.uint8).reshape(-1, RECORD)


def _official_labels(bin_dir, name):
    """All 10,000 official labels of a batch (shared/data/cifar10/partial-binary/)."""
    return np.fromfile(bin_dir.parent / "partial-binary" / f"{name}.labels.u8", dtype=np.uint8)


def _python_batch(records, name, *, bytes_keys=False, protocol=pickle.DEFAULT_PROTOCOL):
    """A python-layout batch built from binary records (the same pixel layout, labels as a list)."""
    batch = {
        "batch_label": f"rebuilt {name}",
        "labels": [int(v) for v in records[:, 0]],
        "data": np.ascontiguousarray(records[:, 1:]),
        "filenames": [f"img_{i}.png" for i in range(len(records))],
    }
    if bytes_keys:  # what the official Python 2 pickles look like when read with encoding="bytes"
        batch = {k.encode(): v for k, v in batch.items()}
    return pickle.dumps(batch, protocol=protocol)


def _write_python_layout(bin_dir, folder, **kwargs):
    folder.mkdir(parents=True)
    for name in ALL:
        (folder / name).write_bytes(_python_batch(_records(bin_dir, name), name, **kwargs))
    shutil.copyfile(bin_dir.parent / "cifar-10-batches-py" / "batches.meta", folder / "batches.meta")
    return folder


def _copy_binary_layout(bin_dir, folder):
    shutil.copytree(bin_dir, folder)
    for p in folder.iterdir():
        p.chmod(0o644)  # the shared copy is read-only
    return folder


# --- binary layout on the real records ------------------------------------------------------------------


def test_binary_records_are_real_cifar10(bin_dir):
    batch = read_binary_batch(bin_dir / "data_batch_1.bin")
    assert batch.labels[:10].tolist() == FIRST_LABELS
    assert len(batch) == 258 and batch.partial and batch.data.shape == (258, 3072)
    for name in ALL:  # every partial file is a faithful prefix of the official label sequence
        labels = read_binary_batch(bin_dir / f"{name}.bin").labels
        np.testing.assert_array_equal(labels, _official_labels(bin_dir, name)[: len(labels)])
    assert np.bincount(_official_labels(bin_dir, "test_batch")).tolist() == [1000] * 10


def test_load_partial_cifar10_warns_once_and_records_it(data_dir, bin_dir, capsys):
    train_set = load_dataset("cifar10", "train", data_dir=data_dir)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "PARTIAL" in warning[0] and "914 of 50000" in warning[0]
    assert "not for measuring accuracy" in warning[0]
    assert train_set.x.shape == (914, 3, 32, 32) and train_set.x.dtype == torch.float32
    assert train_set.y.dtype == torch.int64 and train_set.y[:10].tolist() == FIRST_LABELS
    assert train_set.y[258:268].tolist() == _official_labels(bin_dir, "data_batch_2")[:10].tolist()
    assert train_set.classes[0] == "airplane" and train_set.classes[9] == "truck"
    assert train_set.preprocess == {
        "scale": 1 / 255, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
    }  # fmt: skip
    info = train_set.describe()
    assert info["partial"] is True and info["format"] == "binary" and info["records"] == 914
    assert train_set.head(5).describe()["partial"] is True
    # the normalisation is exactly (x/255 - mean) / std per channel, in R, G, B plane order
    raw = _records(bin_dir, "data_batch_1")[0, 1:].reshape(3, 32, 32).astype(np.float32) / 255
    expected = (raw - np.array([0.4914, 0.4822, 0.4465])[:, None, None]) / np.array([0.2470, 0.2435, 0.2616])[
        :, None, None
    ]
    np.testing.assert_allclose(train_set.x[0].numpy(), expected, atol=1e-6)
    test_set = load_dataset("cifar-10", "test", data_dir=data_dir, limit=10)
    assert len(test_set) == 10 and test_set.limit == 10 and test_set.name == "cifar10"


def test_data_dir_may_be_root_dataset_folder_or_batches_folder(data_dir, bin_dir):
    sources = {
        load_dataset("cifar10", "test", data_dir=d, limit=3).source
        for d in (data_dir, data_dir / "cifar10", bin_dir)
    }
    assert sources == {bin_dir}


def test_missing_files_name_the_fix(tmp_path, data_dir, monkeypatch):
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", "test", data_dir=tmp_path / "nowhere")
    assert "nowhere (does not exist)" in err.value.message and "test_batch.bin" in err.value.message
    assert all(word in err.value.hint for word in ("--data-dir", "LRDEPLOY_DATA", "--download"))
    # the python folder in the shared data holds only batches.meta: not a usable layout
    with pytest.raises(UserError, match="CIFAR-10 train files not found"):
        load_cifar10("train", data_dir=data_dir, fmt="python")
    monkeypatch.setenv("LRDEPLOY_DATA", str(data_dir))
    assert len(load_dataset("cifar10", "test")) == 164
    monkeypatch.delenv("LRDEPLOY_DATA")
    with pytest.raises(UserError, match="files not found"):  # not configured: the (empty) cache only
        load_dataset("cifar10", "test")


def test_size_that_is_not_whole_records_is_a_user_error(bin_dir, tmp_path):
    folder = _copy_binary_layout(bin_dir, tmp_path / "cifar-10-batches-bin")
    blob = (folder / "test_batch.bin").read_bytes()
    (folder / "test_batch.bin").write_bytes(blob[:-1])
    with pytest.raises(UserError, match="not a whole number of 3073-byte records") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "corrupt or truncated" in err.value.hint
    (folder / "test_batch.bin").write_bytes(b"\x0c" + blob[1:])  # label 12
    with pytest.raises(UserError, match="out of 0–9"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_full_binary_batch_is_verified_by_its_official_labels(bin_dir, tmp_path):
    """A full-size batch carrying the official label sequence is accepted as complete; any change is not."""
    records = _records(bin_dir, "test_batch")
    full = np.empty((10000, RECORD), dtype=np.uint8)
    full[:, 1:] = np.resize(records[:, 1:], (10000, 3072))  # pixels repeat: only the labels are checked
    full[:, 0] = _official_labels(bin_dir, "test_batch")
    path = tmp_path / "test_batch.bin"
    full.tofile(path)
    batch = read_binary_batch(path)
    assert len(batch) == 10000 and not batch.partial
    full[5, 0] = (full[5, 0] + 1) % 10
    full.tofile(path)
    with pytest.raises(UserError, match="fails its checksum"):
        read_binary_batch(path)
    full[:, 0] = _official_labels(bin_dir, "data_batch_1")  # another batch's labels under this name
    full.tofile(path)
    with pytest.raises(UserError, match="official test_batch"):
        read_binary_batch(path)


# --- python layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str-keys", "bytes-keys"])
def test_binary_and_python_readers_agree(data_dir, bin_dir, tmp_path, bytes_keys, capsys):
    _write_python_layout(bin_dir, tmp_path / "cifar10" / "cifar-10-batches-py", bytes_keys=bytes_keys)
    for split in ("train", "test"):
        from_bin = load_cifar10(split, data_dir=data_dir)
        from_py = load_dataset("cifar10", split, data_dir=tmp_path)
        assert from_py.describe()["format"] == "python" and from_py.describe()["partial"] is True
        assert from_py.source == tmp_path / "cifar10" / "cifar-10-batches-py"
        assert torch.equal(from_bin.x, from_py.x) and torch.equal(from_bin.y, from_py.y)
    assert capsys.readouterr().err.count("PARTIAL") == 4
    # protocol 5 pickles rebuild arrays through numpy's _frombuffer: allowed too
    (tmp_path / "p5").write_bytes(_python_batch(_records(bin_dir, "test_batch")[:3], "t", protocol=5))
    assert read_python_batch(tmp_path / "p5", "test_batch").labels.tolist() == [3, 8, 8]


def test_full_python_batch_needs_the_official_md5(bin_dir, tmp_path, monkeypatch):
    records = np.resize(_records(bin_dir, "test_batch"), (10000, RECORD))
    path = tmp_path / "test_batch"
    path.write_bytes(_python_batch(records, "test_batch"))
    with pytest.raises(UserError, match="fails its checksum"):  # a full batch that is not the official one
        read_python_batch(path)
    monkeypatch.setitem(cifar10.PYTHON_MD5, "test_batch", hashlib.md5(path.read_bytes()).hexdigest())
    batch = read_python_batch(path)
    assert len(batch) == 10000 and not batch.partial
    assert checksum.is_verified(path, cifar10.PYTHON_MD5["test_batch"])  # not hashed again while unchanged


EVIL = [
    pytest.param(b"cos\nsystem\n(S'touch PWNED'\ntR.", "os.system", id="os.system"),
    pytest.param(b"cposix\nsystem\n(S'touch PWNED'\ntR.", "posix.system", id="posix.system"),
    pytest.param(b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval", id="builtins.eval"),
    pytest.param(pickle.dumps(b"x", protocol=2), "_codecs.encode", id="_codecs"),
]


@pytest.mark.parametrize(("blob", "target"), EVIL)
def test_restricted_unpickler_refuses_anything_but_arrays(blob, target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="refuses to load") as err:
        restricted_loads(blob, source="evil")
    assert target in err.value.message
    assert not (tmp_path / "PWNED").exists()


def test_a_doctored_python_batch_is_refused_before_it_runs(bin_dir, tmp_path, monkeypatch):
    folder = _write_python_layout(bin_dir, tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="references os.system"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not (tmp_path / "PWNED").exists()
    (folder / "test_batch").write_bytes(_python_batch(_records(bin_dir, "test_batch"), "t")[:5000])
    with pytest.raises(UserError, match="not a valid pickle"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": [1, 2, 3], "labels": [1]}))
    with pytest.raises(UserError, match="not a CIFAR-10 batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


# --- download -------------------------------------------------------------------------------------------


def _tarball(bin_dir, path, *, evil=True):
    """A cifar-10-binary.tar.gz made of the local records, plus entries that must never be written."""
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"{n}.bin" for n in ALL] + ["batches.meta.txt"]:
            tar.add(bin_dir / name, arcname=f"cifar-10-batches-bin/{name}")
        if evil:
            for arcname in ("../escaped.txt", "/abs-lrdeploy-test.txt", "cifar-10-batches-bin/readme.html"):
                info = tarfile.TarInfo(arcname)
                info.size = 4
                tar.addfile(info, io.BytesIO(b"evil"))
    return path


def test_download_from_a_tarball_url(bin_dir, tmp_path, capsys):
    (tmp_path / "mirror").mkdir()
    archive = _tarball(bin_dir, tmp_path / "mirror" / "cifar-10-binary.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    folder = download_cifar10(dest, mirrors=["file:///nowhere.invalid/x.tar.gz", archive.as_uri()], md5=md5)
    assert folder == dest / "cifar10"
    assert [p.name for p in dest.iterdir()] == ["cifar10"]  # no staging leftovers
    assert sorted(p.name for p in (folder / "cifar-10-batches-bin").iterdir()) == sorted(
        [f"{n}.bin" for n in ALL] + ["batches.meta.txt"]
    )
    assert not (tmp_path / "escaped.txt").exists() and not (dest / "escaped.txt").exists()
    ds = load_dataset("cifar10", "train", data_dir=dest)
    assert len(ds) == 914 and ds.y[:10].tolist() == FIRST_LABELS


def test_download_checks_the_md5_and_leaves_nothing_behind(bin_dir, tmp_path):
    (tmp_path / "mirror").mkdir()
    archive = _tarball(bin_dir, tmp_path / "mirror" / "c.tar.gz")
    dest = tmp_path / "new" / "cache"
    with pytest.raises(UserError, match="could not download CIFAR-10") as err:
        download_cifar10(dest, mirrors=[archive.as_uri()])  # the official md5: this archive is not it
    assert "differs from the official c32a1d4a" in err.value.message
    assert not (tmp_path / "new").exists()


def test_unsafe_members_under_expected_names_are_refused(bin_dir, tmp_path):
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="not a plain batch file"):
        download_cifar10(tmp_path / "dest", mirrors=[archive.as_uri()], md5=md5)
    assert not (tmp_path / "dest").exists()


def test_load_with_download_uses_the_official_url_and_digest(bin_dir, tmp_path, monkeypatch):
    (tmp_path / "mirror").mkdir()
    archive = _tarball(bin_dir, tmp_path / "mirror" / "cifar-10-binary.tar.gz", evil=False)
    monkeypatch.setattr(cifar10, "TARBALL_URL", archive.as_uri())
    monkeypatch.setattr(cifar10, "TARBALL_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(UserError, match="files not found"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "data")
    ds = load_dataset("cifar10", "test", data_dir=tmp_path / "data", download=True, limit=7)
    assert ds.source == tmp_path / "data" / "cifar10" / "cifar-10-batches-bin" and len(ds) == 7
    # through the generic entry point too (mirrors are then full URLs of the archive)
    folder = download_dataset("cifar10", tmp_path / "other", mirrors=[archive.as_uri()])
    assert folder == tmp_path / "other" / "cifar10"


# --- training on CIFAR with augmentation ----------------------------------------------------------------


def test_seeded_training_with_crop_flip_is_reproducible(data_dir, capsys):
    train_set = load_dataset("cifar10", "train", data_dir=data_dir, limit=128)
    test_set = load_dataset("cifar10", "test", data_dir=data_dir, limit=64)

    class SeenBatches:  # a training_loss hook that only records what the model was fed
        def __init__(self):
            self.batches = []

        def training_loss(self, model, xb, yb):
            self.batches.append(xb.clone())

    def run():
        torch.manual_seed(0)
        model = create_model("resnet18", width=8)
        seen = SeenBatches()
        config = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False, augment="crop-flip")
        result = train(model, train_set, test_set, config, hooks=[seen])
        return result, torch.cat([p.detach().flatten() for p in result.model.parameters()]), seen.batches

    a, wa, seen_a = run()
    b, wb, seen_b = run()
    assert torch.equal(wa, wb) and a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert len(seen_a) == 2 and all(torch.equal(p, q) for p, q in zip(seen_a, seen_b, strict=True))
    fed = torch.cat(seen_a)
    assert fed.shape == train_set.x.shape and not torch.equal(fed.sort(0).values, train_set.x.sort(0).values)
    assert 0.0 <= a.test_accuracy <= 1.0 and np.isfinite(a.train_loss)
