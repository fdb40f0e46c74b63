"""The fold-cost cache never stops an export: bad files and entries are dropped and re-measured, an unusable
location means "run without saving", and every problem is ONE warning line naming the cache path.

In-process: real cache files, real ONNX Runtime timings (shrunk), real folded models. The CLI cases are in
tests/adversarial/test_cache.py.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrdeploy.compress import compress
from lrdeploy.exporters import fold_cost
from lrdeploy.exporters.fold import fold_with_report
from lrdeploy.exporters.fold_cost import CostCache, MeasureConfig, clean_entry, load_entries, open_cache
from lrdeploy.layers import LOWRANK_TYPES
from lrdeploy.models import create_model

TINY = MeasureConfig(warmup=1, min_rounds=3, budget_s=0.0)
GOOD = {"dense_ms": 1.5, "factored_ms": {"4": 1.0, "9": 2.0}, "measured_at": 1.7e9,
        "shape": {"kind": "linear", "sample_shape": [400], "bias": True}}


def _write(path: Path, entries: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": fold_cost.CACHE_VERSION, "entries": entries}))
    return path


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "fold-cost cache" in line]


def _assert_valid(entries: dict) -> None:
    """Every entry is in the schema: what the fold decision may divide by and compare."""
    for key, entry in entries.items():
        assert isinstance(key, str)
        assert clean_entry(entry) == entry
        assert math.isfinite(entry["dense_ms"]) and entry["dense_ms"] > 0
        assert entry["factored_ms"] and all(math.isfinite(v) and v > 0 for v in entry["factored_ms"].values())
        assert all(int(r) >= 1 for r in entry["factored_ms"])


# ------------------------------------------------------------------------------------------ bad entries
BAD_ENTRIES = {
    "zero": {"dense_ms": 0, "factored_ms": {"4": 1.0}},
    "zero-factored": {"dense_ms": 1.0, "factored_ms": {"4": 0.0}},
    "string": {"dense_ms": "1.0", "factored_ms": {"4": 1.0}},
    "negative": {"dense_ms": -1.0, "factored_ms": {"4": 1.0}},
    "nan": {"dense_ms": float("nan"), "factored_ms": {"4": 1.0}},
    "inf": {"dense_ms": 1.0, "factored_ms": {"4": float("inf")}},
    "bool": {"dense_ms": True, "factored_ms": {"4": 1.0}},
    "huge-int": {"dense_ms": 10**400, "factored_ms": {"4": 1.0}},
    "no-dense": {"factored_ms": {"4": 1.0}},
    "factored-list": {"dense_ms": 1.0, "factored_ms": [1.0]},
    "factored-empty": {"dense_ms": 1.0, "factored_ms": {}},
    "rank-zero": {"dense_ms": 1.0, "factored_ms": {"0": 1.0}},
    "rank-text": {"dense_ms": 1.0, "factored_ms": {"four": 1.0}},
    "rank-padded": {"dense_ms": 1.0, "factored_ms": {"04": 1.0}},
    "measured-at-text": {**GOOD, "measured_at": "yesterday"},
    "shape-nested": {**GOOD, "shape": {"kind": {"deep": [[1]]}}},
    "not-a-dict": [1.0, 2.0],
}


@pytest.mark.parametrize("name", sorted(BAD_ENTRIES))
def test_bad_entry_is_dropped_good_one_kept(tmp_path, name):
    path = tmp_path / "fold-cost.json"
    # json.dumps writes NaN/Infinity literals, which Python's reader accepts: they must still be refused.
    path.write_text(json.dumps({"version": 1, "entries": {"bad": BAD_ENTRIES[name], "good": GOOD}}))
    cache = CostCache(path)
    assert cache.get("bad") is None and cache.get("good") == GOOD
    assert cache.warning() == f"warning: fold-cost cache {path}: 1 invalid entry dropped (re-measured)"


def test_clean_entry_drops_unknown_keys_and_normalises():
    entry = {"dense_ms": 2, "factored_ms": {"3": 1}, "extra": {"a": [1, {"b": 2}]}}
    assert clean_entry(entry) == {"dense_ms": 2.0, "factored_ms": {"3": 1.0}}


# -------------------------------------------------------------------------------------- bad whole files
BAD_FILES = {
    "truncated": (json.dumps({"version": 1, "entries": {"k": GOOD}})[:-7].encode(), "not valid JSON"),
    "not-utf8": (b'{"version": 1, "entries": {"\xff\xfe": 1}}', "not UTF-8"),
    "deeply-nested": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "top-level-list": (b"[1, 2, 3]", "no 'entries' map"),
    "entries-list": (b'{"version": 1, "entries": [1]}', "no 'entries' map"),
    "other-version": (json.dumps({"version": 99, "entries": {"k": GOOD}}).encode(), "version 99"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_ignored_with_one_warning_and_replaced_by_a_clean_copy(tmp_path, capsys, name):
    raw, needle = BAD_FILES[name]
    path = tmp_path / "fold-cost.json"
    path.write_bytes(raw)
    cache = CostCache(path)
    assert cache.entries == {}
    cache.put("k", dict(GOOD))
    cache.save()
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], lines
    assert json.loads(path.read_text()) == {"version": 1, "entries": {"k": GOOD}}


def test_time_zero_entry_is_remeasured_not_used_and_not_written_back(tmp_path, capsys):
    """A LeNet with every cached time 0 (once a ZeroDivisionError): exact fold, re-measured, clean file."""
    torch.manual_seed(0)
    model = create_model("lenet5")
    compress(model, rank_ratio=0.5, keep_first_conv=False, keep_classifier=False)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    _, first = fold_with_report(model, example_input=x, cache_dir=tmp_path, threads=1, measure_config=TINY)
    assert first.measured_shapes == 5 and not _warnings(capsys.readouterr().err)
    path = tmp_path / "fold-cost.json"
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["dense_ms"] = 0
    path.write_text(json.dumps(data))

    folded, report = fold_with_report(model, example_input=x, cache_dir=tmp_path, threads=1,
                                      measure_config=TINY)
    assert report.measured_shapes == 5 and report.cached_shapes == 0  # none of the bad entries was used
    assert all(lf.dense_ms > 0 and not lf.cached for lf in report.layers)
    lines = _warnings(capsys.readouterr().err)
    assert lines == [f"warning: fold-cost cache {path}: 5 invalid entries dropped (re-measured)"]  # not 5
    saved = json.loads(path.read_text())["entries"]
    assert set(saved) == set(data["entries"]) and all(e["dense_ms"] > 0 for e in saved.values())
    _assert_valid(saved)
    assert not any(isinstance(m, LOWRANK_TYPES) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ unusable locations
def _lenet_fold(cache_dir: Path | None) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = create_model("lenet5")
    compress(model, rank_ratio=0.5, keep_first_conv=False, keep_classifier=False)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    folded, report = fold_with_report(model, example_input=x, cache_dir=cache_dir, threads=1,
                                      measure_config=TINY)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    return folded, report


def test_cache_dir_under_a_regular_file_runs_without_saving_and_warns_once(tmp_path, capsys):
    # Root ignores permission bits, so "unwritable" is made the reliable way: a folder below a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache_dir = blocker / "lrdeploy"
    _, report = _lenet_fold(cache_dir)
    assert report.measured_shapes == 5
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert str(cache_dir / "fold-cost.json") in lines[0] and "Not a directory" in lines[0]
    assert "not saved" in lines[0]
    assert blocker.read_text() == "x"
    _lenet_fold(cache_dir)  # same problem again in this process: not repeated
    assert _warnings(capsys.readouterr().err) == []


def test_cache_path_is_a_directory_left_alone(tmp_path, capsys):
    (tmp_path / "fold-cost.json" / "inner").mkdir(parents=True)
    _lenet_fold(tmp_path)
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "is a directory" in lines[0] and str(tmp_path / "fold-cost.json") in lines[0]
    assert (tmp_path / "fold-cost.json" / "inner").is_dir()


def test_save_failure_is_reported_not_raised(tmp_path, capsys):
    """The location vanishes between read and save (a file now sits where the folder was)."""
    cache_dir = tmp_path / "c"
    cache = CostCache(cache_dir / "fold-cost.json")  # missing file: no problem yet
    assert cache.warning() is None
    cache_dir.write_text("now a file")
    cache.put("k", dict(GOOD))
    cache.save()
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "cannot save it" in lines[0] and "not kept" in lines[0]
    assert cache.get("k") == GOOD  # still usable for the rest of the run


def test_default_location_follows_xdg_then_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fold_cost.default_cache_dir() == tmp_path / "xdg" / "lrdeploy"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fold_cost.default_cache_dir() == tmp_path / "home" / ".cache" / "lrdeploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "not-absolute")  # would scatter .cache into the current directory
    cache = open_cache()
    assert cache.path is None and cache.entries == {}
    cache.put("k", dict(GOOD))
    cache.save()
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "not an absolute path" in lines[0] and "without a cache" in lines[0]
    assert not Path("not-absolute").exists()


def test_measured_zero_is_not_cached(tmp_path):
    cache = CostCache(tmp_path / "fold-cost.json")
    cache.put("zero", {"dense_ms": 0.0, "factored_ms": {"1": 1.0}})
    cache.save()
    assert cache.get("zero") is None and not (tmp_path / "fold-cost.json").exists()


# -------------------------------------------------------------------------------------------- property
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_ms = st.floats(min_value=1e-6, max_value=1e6)
_ranks = st.integers(1, 4096).map(str)
_valid_entry = st.fixed_dictionaries(
    {"dense_ms": _ms, "factored_ms": st.dictionaries(_ranks, _ms, min_size=1, max_size=3)},
    optional={"measured_at": st.floats(min_value=0, max_value=2e9)},
)
_entries = st.dictionaries(st.text(max_size=8), st.one_of(_valid_entry, _json), max_size=6)


def _load(raw: bytes) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fold-cost.json"
        path.write_bytes(raw)
        return load_entries(path)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_entries, version=st.sampled_from([1, 1, 1, 2, "1", None]))
def test_loading_arbitrary_json_never_raises_and_keeps_exactly_the_valid_entries(entries, version):
    raw = json.dumps({"version": version, "entries": entries}).encode()
    loaded, problems = _load(raw)
    _assert_valid(loaded)
    if version != 1:
        assert loaded == {} and len(problems) == 1
        return
    expected = {k: clean_entry(v) for k, v in entries.items() if clean_entry(v) is not None}
    assert loaded == expected
    assert bool(problems) == (len(expected) != len(entries))
    # Whatever was kept survives a save and a re-load unchanged.
    with tempfile.TemporaryDirectory() as d:
        cache = CostCache(Path(d) / "fold-cost.json")
        for k, v in loaded.items():
            cache.put(k, v)
        cache.save()
        assert load_entries(Path(d) / "fold-cost.json") == (loaded, [])


@settings(max_examples=50, deadline=None)
@given(doc=st.one_of(_json, st.binary(max_size=200)))
def test_loading_arbitrary_bytes_or_json_never_raises(doc):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    loaded, problems = _load(raw)
    _assert_valid(loaded)
    assert isinstance(problems, list) and all(isinstance(p, str) and "\n" not in p for p in problems)
