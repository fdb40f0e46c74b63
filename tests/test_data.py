"""IDX parsing, checksums, data-dir resolution and download, on the real MNIST and Fashion-MNIST files."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import struct

import numpy as np
import pytest

from lrdeploy.data import (
    DATASETS,
    checksum,
    download_dataset,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    parse_idx,
    read_idx,
)
from lrdeploy.data.datasets import BUILTIN_DIR
from lrdeploy.errors import UserError

MNIST_FILES = [f.filename for f in DATASETS["mnist"].all_files()]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No test may see the developer's LRDEPLOY_DATA or ~/.cache, nor another test's verified-file cache."""
    monkeypatch.delenv("LRDEPLOY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    checksum.clear_cache()


@pytest.fixture(scope="module")
def mnist_train(data_dir):
    return load_dataset("mnist", "train", data_dir=data_dir)


def _copy(src_dir, dst_dir, names=None):
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in names or MNIST_FILES:
        shutil.copyfile(src_dir / name, dst_dir / name)
    return dst_dir


# --- IDX ------------------------------------------------------------------------------------------------


def test_idx_reads_the_real_mnist_files(data_dir):
    folder = data_dir / "mnist"
    train_x = read_idx(folder / "train-images-idx3-ubyte.gz")
    train_y = read_idx(folder / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28)
    assert train_y.shape == (60000,) and test_y.shape == (10000,)
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert train_y.min() >= 0 and train_y.max() <= 9
    # label counts from shared/data/README.md
    assert np.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_idx_parses_other_dtypes_and_raw_files(tmp_path):
    data = struct.pack(">HBBII", 0, 0x0D, 2, 2, 3) + np.arange(6, dtype=">f4").tobytes()
    (tmp_path / "a.idx").write_bytes(data)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), np.arange(6).reshape(2, 3))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"PK\x03\x04" + bytes(20), "bad magic"),
        (struct.pack(">HBB", 0, 0x08, 3) + bytes(4), "header cut short"),
        (struct.pack(">HBBI", 0, 0x08, 1, 10) + bytes(9), "header promises 18 bytes"),
        (struct.pack(">HBBI", 0, 0x08, 1, 10) + bytes(11), "file has 19"),
    ],
)
def test_corrupt_idx_is_a_user_error(data, why):
    with pytest.raises(UserError, match=why) as err:
        parse_idx(data, source="x.idx")
    assert "x.idx is not a valid IDX file" in err.value.message


def test_truncated_or_corrupt_gzip_is_a_user_error(data_dir, tmp_path):
    blob = (data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "short.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="not a valid gzip file"):
        read_idx(tmp_path / "short.gz")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    (tmp_path / "flipped.gz").write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="not a valid gzip file"):
        read_idx(tmp_path / "flipped.gz")
    with pytest.raises(UserError, match="file not found"):
        read_idx(tmp_path / "absent.gz")


# --- specs ----------------------------------------------------------------------------------------------


def test_dataset_specs_and_lookup():
    assert [s.name for s in list_datasets()] == ["mnist", "fashion-mnist"]
    assert get_dataset_spec("Fashion_MNIST").name == "fashion-mnist"
    with pytest.raises(UserError) as err:
        get_dataset_spec("fashion")
    assert "mnist" in err.value.hint and "fashion-mnist" in err.value.hint
    for spec in list_datasets():
        assert len(spec.classes) == spec.num_classes == 10
        assert spec.mirrors and all(m.endswith("/") for m in spec.mirrors)
        assert spec.preprocess["scale"] == pytest.approx(1 / 255)


def test_package_ships_the_verified_mnist(data_dir):
    for name in MNIST_FILES:
        assert (BUILTIN_DIR / "mnist" / name).read_bytes() == (data_dir / "mnist" / name).read_bytes()


# --- loading --------------------------------------------------------------------------------------------


def test_load_full_mnist(mnist_train, data_dir):
    ds = mnist_train
    assert len(ds) == 60000 and ds.x.shape == (60000, 1, 28, 28)
    assert str(ds.x.dtype) == "torch.float32" and str(ds.y.dtype) == "torch.int64"
    assert ds.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert ds.classes == [str(d) for d in range(10)] and ds.name == "mnist" and ds.split == "train"
    assert ds.source == data_dir / "mnist"
    assert ds.preprocess == {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]}
    # normalised with the recorded statistics: mean ≈ 0 and std ≈ 1 over the training set
    assert abs(ds.x.mean().item()) < 1e-3 and abs(ds.x.std().item() - 1) < 1e-3
    raw = read_idx(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz")
    test = load_dataset("mnist", "test", data_dir=data_dir, limit=3)
    expected = (raw[:3].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(test.x[:, 0].numpy(), expected, rtol=0, atol=1e-6)


def test_normalisation_stats_match_the_training_images(data_dir):
    for spec in list_datasets():
        images = read_idx(data_dir / spec.folder / "train-images-idx3-ubyte.gz")
        counts = np.bincount(images.reshape(-1), minlength=256)  # exact and fast: 256 bins, not 47M floats
        values = np.arange(256) / 255
        mean = (counts * values).sum() / counts.sum()
        std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
        assert mean == pytest.approx(spec.mean[0], abs=5e-4)
        assert std == pytest.approx(spec.std[0], abs=5e-4)


def test_fashion_mnist_loads(data_dir):
    ds = load_dataset("fashion-mnist", "test", data_dir=data_dir)
    assert len(ds) == 10000 and ds.x.shape == (10000, 1, 28, 28)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert sorted(set(ds.y.tolist())) == list(range(10))


def test_data_dir_may_be_root_or_dataset_folder(data_dir):
    a = load_dataset("mnist", "test", data_dir=data_dir, limit=50)
    b = load_dataset("mnist", "test", data_dir=data_dir / "mnist", limit=50)
    assert a.source == b.source == data_dir / "mnist"
    assert (a.x == b.x).all() and (a.y == b.y).all()


def test_limit_keeps_the_first_samples(data_dir):
    ds = load_dataset("mnist", "train", data_dir=data_dir, limit=10)
    assert len(ds) == 10 and ds.y.tolist()[:5] == [5, 0, 4, 1, 9]
    assert ds.limit == 10 and ds.describe()["size"] == 10
    assert len(load_dataset("mnist", "test", data_dir=data_dir, limit=10**9)) == 10000
    assert len(ds.head(3)) == 3
    with pytest.raises(UserError, match="at least 1"):
        load_dataset("mnist", "test", data_dir=data_dir, limit=0)
    with pytest.raises(UserError, match="unknown split"):
        load_dataset("mnist", "validation", data_dir=data_dir)


def test_missing_dir_names_the_fix(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("mnist", "test", data_dir=tmp_path / "nowhere")
    assert "nowhere (does not exist)" in err.value.message
    assert "t10k-images-idx3-ubyte.gz" in err.value.message
    assert all(word in err.value.hint for word in ("--data-dir", "LRDEPLOY_DATA", "--download"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="files not found"):
        load_dataset("mnist", "test", data_dir=tmp_path / "empty")


def test_env_var_is_used_and_is_not_silently_replaced(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LRDEPLOY_DATA", str(data_dir))
    assert load_dataset("fashion-mnist", "test", limit=5).source == data_dir / "fashion-mnist"
    monkeypatch.setenv("LRDEPLOY_DATA", str(tmp_path))
    with pytest.raises(UserError, match="files not found"):  # not the builtin copy behind the user's back
        load_dataset("mnist", "test", limit=5)


def test_without_configuration_the_cache_then_the_builtin_copy_is_used(data_dir, monkeypatch, tmp_path):
    assert load_dataset("mnist", "test", limit=5).source == BUILTIN_DIR / "mnist"
    with pytest.raises(UserError, match="Fashion-MNIST test files not found"):
        load_dataset("fashion-mnist", "test")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _copy(data_dir / "mnist", tmp_path / "lrdeploy" / "datasets" / "mnist", MNIST_FILES[2:])
    assert load_dataset("mnist", "test", limit=5).source == tmp_path / "lrdeploy" / "datasets" / "mnist"


def test_extracted_files_and_torchvision_layout_are_accepted(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES[2:]:
        content = gzip.decompress((data_dir / "mnist" / name).read_bytes())
        (raw / name.removesuffix(".gz")).write_bytes(content)
    ds = load_dataset("mnist", "test", data_dir=tmp_path)
    assert ds.source == raw and len(ds) == 10000


def test_altered_content_fails_the_checksum(data_dir, tmp_path):
    folder = _copy(data_dir / "mnist", tmp_path / "mnist", MNIST_FILES[2:])
    labels = bytearray(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # a valid IDX file with one wrong label
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(UserError, match="fails its checksum") as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert "corrupt" in err.value.hint
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels[:-1])))
    with pytest.raises(UserError, match="wrong length"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_the_wrong_dataset_folder_is_named(data_dir):
    with pytest.raises(UserError) as err:
        load_dataset("fashion-mnist", "test", data_dir=data_dir / "mnist")
    assert "it is the MNIST test images file" in err.value.message
    assert "another dataset" in err.value.hint


def test_verified_files_are_not_hashed_again_until_they_change(data_dir, monkeypatch, tmp_path):
    folder = _copy(data_dir / "mnist", tmp_path / "mnist", MNIST_FILES[2:])
    load_dataset("mnist", "test", data_dir=folder)

    class NoHash:
        @staticmethod
        def sha256(data):
            raise AssertionError("hashed again")

    monkeypatch.setattr(checksum, "hashlib", NoHash)
    load_dataset("mnist", "test", data_dir=folder)  # cached: no hashing
    st = (folder / "t10k-labels-idx1-ubyte.gz").stat()
    os.utime(folder / "t10k-labels-idx1-ubyte.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="hashed again"):
        load_dataset("mnist", "test", data_dir=folder)


# --- download -------------------------------------------------------------------------------------------


def test_download_from_a_mirror(data_dir, tmp_path):
    mirror = _copy(data_dir / "mnist", tmp_path / "mirror")
    dest = tmp_path / "dest"
    folder = download_dataset("mnist", dest, mirrors=["file://nowhere.invalid/x/", mirror.as_uri() + "/"])
    assert folder == dest / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)
    assert [p.name for p in dest.iterdir()] == ["mnist"]  # no staging leftovers
    assert len(load_dataset("mnist", "test", data_dir=dest)) == 10000
    # already complete: nothing is fetched (an empty mirror list would otherwise fail)
    assert download_dataset("mnist", dest, mirrors=[]) == folder


def test_download_with_a_checksum_mismatch_leaves_nothing_behind(data_dir, tmp_path):
    mirror = _copy(data_dir / "mnist", tmp_path / "mirror")
    blob = bytearray(gzip.decompress((mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    blob[-1] ^= 1
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(blob)))  # the last file fetched
    dest = tmp_path / "new" / "cache"
    with pytest.raises(UserError, match="could not download MNIST t10k-labels") as err:
        download_dataset("mnist", dest, mirrors=[mirror.as_uri()])
    assert "fails its checksum" in err.value.message
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError):
        download_dataset("mnist", existing, mirrors=[mirror.as_uri()])
    assert list(existing.iterdir()) == []


def test_load_with_download_fetches_into_the_data_dir(data_dir, monkeypatch, tmp_path):
    mirror = _copy(data_dir / "mnist", tmp_path / "mirror")
    spec = DATASETS["mnist"]
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(spec, mirrors=(mirror.as_uri(),)))
    with pytest.raises(UserError, match="files not found"):
        load_dataset("mnist", "test", data_dir=tmp_path / "data")
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "data", download=True, limit=7)
    assert ds.source == tmp_path / "data" / "mnist" and len(ds) == 7
