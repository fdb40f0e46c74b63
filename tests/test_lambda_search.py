"""Maestro's λ search (`train --target-accuracy-drop`) through the real CLI, on real MNIST."""

from __future__ import annotations

import pytest

from lrdeploy.bundle import load_bundle, read_manifest

from .test_cli import invoke

RUN = ("--model", "lenet5", "--data", "mnist", "--limit-train", "1200", "--limit-test", "300",
       "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--method", "maestro",
       "--checkpoint-every", "0")


def test_search_halves_lambda_until_the_target_holds_and_records_the_path(data_dir, tmp_path):
    out = tmp_path / "runs" / "searched"  # a parent that does not exist yet, as runs/ on a fresh checkout
    # a 60-point target is met by the first, most regularised trial (λ × 8)
    r = invoke("train", *RUN, "--data-dir", data_dir, "--target-accuracy-drop", "60", "--search-trials", "3",
               "--out", out)
    assert r.exit_code == 0, r.output
    record = read_manifest(out)["method"]["lambda_search"]
    assert record["met"] and record["chosen_trial"] == 0 and len(record["trials"]) == 1
    trial = record["trials"][0]
    assert trial["validation_accuracy"] >= record["dense_validation_accuracy"] - 0.60
    assert trial["lambda_scale"] == 8.0 and record["lambda_gl"] == trial["lambda_gl"] > 0
    metrics = read_manifest(out)["metrics"]
    assert metrics["validation_samples"] == 120 and "test_accuracy" in metrics  # 10 % held out, test beside
    # the manifest's digest still holds after the record was added
    assert load_bundle(out).manifest["method"]["log"]["lambda_gl"] == record["lambda_gl"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["searched"]  # trials and the dense run cleaned up


@pytest.mark.slow
def test_a_missed_target_writes_the_last_trial_and_exits_1(data_dir, tmp_path):
    missed = tmp_path / "missed"
    r = invoke("train", *RUN, "--data-dir", data_dir, "--target-accuracy-drop", "0.001", "--search-trials",
               "2", "--method-opt", "pull=5", "--out", missed)
    assert r.exit_code == 1, r.output  # a missed target is a missed gate
    record = read_manifest(missed)["method"]["lambda_search"]
    assert not record["met"] and len(record["trials"]) == 2 and record["chosen_trial"] == 1
    first, second = record["trials"]
    assert second["lambda_gl"] == first["lambda_gl"] / 2  # halved


def test_search_refuses_what_it_cannot_do(tmp_path):
    dense = [a if a != "maestro" else "dense" for a in RUN]
    cases = [((*dense, "--target-accuracy-drop", "1"), "--method maestro"),
             ((*RUN, "--target-accuracy-drop", "1", "--method-opt", "lambda_gl=0.01"), "lambda_gl"),
             ((*RUN, "--target-accuracy-drop", "0"), "target-accuracy-drop")]
    for i, (args, needle) in enumerate(cases):
        r = invoke("train", *args, "--out", tmp_path / str(i))
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert not any(tmp_path.iterdir())
