"""Numbers a report prints come from what is measured, not from what a file claims about itself."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx

from lrdeploy.exporters.graph_stats import graph_stats
from lrdeploy.exporters.onnx import META_MANIFEST

from .conftest import Snapshot, lrdeploy

CLAIMED = {"params": 7, "flops": 11, "weights_bytes": 13}


def test_compare_reports_the_graphs_sizes_not_the_manifests_claim(lenet_bundle, lenet_onnx, data_dir,
                                                                  tmp_path):
    """An .onnx whose stamped manifest claims 7 parameters and 11 FLOPs (consistently stamped, checksum and
    all, as a stale or buggy exporter would leave it): the report counts the graph, and keeps the claim only
    as the trained structure."""
    lying = tmp_path / "lying.onnx"
    shutil.copyfile(lenet_onnx, lying)
    proto = onnx.load(str(lying))
    props = {p.key: p.value for p in proto.metadata_props}
    props[META_MANIFEST] = json.dumps({**json.loads(props[META_MANIFEST]), **CLAIMED}, sort_keys=True)
    if f"{META_MANIFEST}_sha256" in props:  # the stamp's own checksum, so the file reads as untampered
        props[f"{META_MANIFEST}_sha256"] = hashlib.sha256(props[META_MANIFEST].encode("utf-8")).hexdigest()
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(lying))
    truth = graph_stats(lying)
    assert truth.params > 60_000 and truth.flops > 800_000  # a LeNet-5, far from the claim
    report_path = tmp_path / "report.json"
    inputs = Snapshot([lenet_bundle, lying])

    proc = lrdeploy("compare", lenet_bundle, lying, "--data-dir", data_dir, "--limit-test", 64,
                    "--seconds", 0.05, "--batch", 1, "--json", report_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(report_path.read_text())
    cand, ref = report["candidate"], report["reference"]
    assert (cand["params"], cand["flops"], cand["weights_bytes"]) == (truth.params, truth.flops,
                                                                      truth.weights_bytes)
    assert cand["trained"] == {"params": 7, "flops": 11}  # the claim, labelled as such
    # the same network on both sides: the ratios are the graph's 1.0, not 61,706 / 7
    assert (ref["params"], ref["flops"]) == (truth.params, truth.flops)
    assert report["ratios"]["params"] == 1.0 and report["ratios"]["flops"] == 1.0
    assert f"{truth.params:,}" in proc.stdout and "trained structure" in proc.stdout
    inputs.assert_unchanged()
