"""`lrdeploy triton`: the model repository, every config.pbtxt parsed back into Triton's own ModelConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="the serve extra (tritonclient[grpc]) is not installed")

from google.protobuf import text_format  # noqa: E402

from lrdeploy.cli import app  # noqa: E402
from tests.test_serve import WIDTH, mlp_onnx, text_onnx  # noqa: E402

runner = CliRunner()


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton")
    out = {"dense": mlp_onnx(root / "dense.onnx"), "fixed": mlp_onnx(root / "fixed.onnx", batch=2),
           "text": text_onnx(root / "text.onnx", vocab=50)}
    (root / "text.tokenizer.json").write_text('{"stand-in": "tokenizer"}')
    return out


def test_repository_layout_and_configs(artefacts, tmp_path):
    repo = tmp_path / "repo"
    files = [str(artefacts[n]) for n in ("dense", "fixed", "text")]
    r = runner.invoke(app, ["triton", *files, "--repo", str(repo), "--max-batch", "16", "--instances", "2",
                            "--threads", "1", "--max-delay-ms", "1.5"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in repo.iterdir()) == ["dense", "fixed", "lrdeploy-triton.json", "text"]
    assert (repo / "dense" / "1" / "model.onnx").read_bytes() == artefacts["dense"].read_bytes()
    assert (repo / "text" / "tokenizer.json").read_text() == '{"stand-in": "tokenizer"}'
    assert not (repo / "dense" / "tokenizer.json").exists()

    dense = parse(repo / "dense" / "config.pbtxt")
    assert dense.name == "dense" and dense.platform == "onnxruntime_onnx" and dense.max_batch_size == 16
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in dense.input] == [
        ("x", "TYPE_FP32", [WIDTH])]
    assert [(o.name, list(o.dims)) for o in dense.output] == [("logits", [4])]
    assert list(dense.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert dense.dynamic_batching.max_queue_delay_microseconds == 1500
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in dense.instance_group] \
        == [(2, "KIND_CPU")]
    params = {k: v.string_value for k, v in dense.parameters.items()}
    assert params == {"intra_op_thread_count": "1", "inter_op_thread_count": "1", "execution_mode": "0"}

    fixed = parse(repo / "fixed" / "config.pbtxt")  # no dynamic batch axis: full dims, no batcher
    assert fixed.max_batch_size == 0 and list(fixed.input[0].dims) == [2, WIDTH]
    assert not fixed.HasField("dynamic_batching")

    text = parse(repo / "text" / "config.pbtxt")
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in text.input] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1])]

    out = " ".join(r.output.split())
    assert f"tritonserver --model-repository={repo.resolve()}" in out
    assert "perf_analyzer -m dense -u 127.0.0.1:8000 -i http --concurrency-range 1:32:8" in out
    assert "--shape input_ids:16 --shape attention_mask:16" in out
    assert json.loads((repo / "lrdeploy-triton.json").read_text())["models"] == ["dense", "fixed", "text"]


def test_nothing_is_replaced_without_force(artefacts, tmp_path):
    repo = tmp_path / "repo"
    assert runner.invoke(app, ["triton", str(artefacts["dense"]), "--repo", str(repo)]).exit_code == 0
    again = runner.invoke(app, ["triton", str(artefacts["fixed"]), "--repo", str(repo)])
    assert again.exit_code == 2 and "exists" in again.output and (repo / "dense").is_dir()
    forced = runner.invoke(app, ["triton", str(artefacts["fixed"]), "--repo", str(repo), "--force"])
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in repo.iterdir()) == ["fixed", "lrdeploy-triton.json"]
    (repo / "mine").mkdir()  # the user's own model in our repository: --force must not delete it
    refused = runner.invoke(app, ["triton", str(artefacts["dense"]), "--repo", str(repo), "--force"])
    assert refused.exit_code == 2 and "not an lrdeploy Triton model repository" in refused.output
    assert (repo / "mine").is_dir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    not_ours = runner.invoke(app, ["triton", str(artefacts["dense"]), "--repo", str(other), "--force"])
    assert not_ours.exit_code == 2 and (other / "notes.txt").is_file()


def test_tensorrt_engine_gets_a_tensorrt_plan_config(artefacts, tmp_path):
    plan = tmp_path / "dense.plan"
    plan.write_bytes(b"not a real engine: the writer copies it and reads its sidecar")
    profile = {"x": [[1, WIDTH], [8, WIDTH], [8, WIDTH]]}
    (tmp_path / "dense.plan.json").write_text(json.dumps({"onnx_path": str(artefacts["dense"]),
                                                          "profile": profile}))
    repo = tmp_path / "repo"
    r = runner.invoke(app, ["triton", str(plan), "--repo", str(repo), "--max-batch", "32"])
    assert r.exit_code == 0, r.output
    config = parse(repo / "dense" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8  # the profile's largest batch
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert not config.parameters  # ORT settings do not apply to an engine
    assert (repo / "dense" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    orphan = tmp_path / "orphan.plan"
    orphan.write_bytes(b"x")
    bad = runner.invoke(app, ["triton", str(orphan), "--repo", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "cannot find the ONNX graph" in bad.output


def test_a_config_that_does_not_parse_is_refused():
    from lrdeploy.errors import UserError
    from lrdeploy.serving.runtimes.base import IOInfo
    from lrdeploy.serving.triton_repo import RepoModel, validate_config

    model = RepoModel("m", Path("m.onnx"), [IOInfo("x", __import__("numpy").dtype("float32"), ("b", 2))],
                      [IOInfo("y", __import__("numpy").dtype("float32"), ("b", 2))])
    with pytest.raises(UserError, match="does not parse"):
        validate_config('name: "m" platform: "onnxruntime_onnx" max_batch_size: "many"', model)
    with pytest.raises(UserError, match="differ from the model"):
        validate_config('name: "m" platform: "onnxruntime_onnx" input [ { name: "z" } ]', model)
