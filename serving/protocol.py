"""The Open Inference Protocol (KServe v2) wire format: tensors in JSON and in the binary-data extension.

Only the encoding lives here (no HTTP, no model): an infer request body → named numpy arrays, named arrays →
a response body, each protocol datatype ↔ a numpy dtype. Anything malformed is a :class:`ProtocolError` with
the HTTP status the server answers (4xx): a bad request is the client's mistake and never a server error.

Binary-data extension (what ``tritonclient.http`` sends by default): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, in input order, each input that carries
``parameters.binary_data_size`` taking that many bytes; BYTES elements are a 4-byte little-endian length and
the bytes. Outputs go back in binary when the request asks (``parameters.binary_data_output``, or
``binary_data`` on a requested output), as JSON ``data`` otherwise.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Protocol datatype ↔ numpy dtype (BYTES: an object array of bytes).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
MAX_RANK = 16  # deeper tensors are not a model input; refusing them early bounds the work per request


class ProtocolError(Exception):
    """A request the server refuses: ``status`` is the HTTP status (4xx), ``message`` goes to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def datatype_of(dtype: Any) -> str:
    """The protocol's name of a numpy dtype (``float32`` → ``FP32``)."""
    dtype = np.dtype(dtype)
    for name, known in DATATYPES.items():
        if known == dtype:
            return name
    if dtype.kind in ("U", "S"):
        return "BYTES"
    raise ValueError(f"no Open Inference Protocol datatype for {dtype}")


@dataclass
class InferRequest:
    """A decoded infer request: inputs by name (in request order), what to return, and how."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str | None = None
    outputs: list[str] | None = None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)
    binary_all: bool = False

    def wants_binary(self, name: str) -> bool:
        return self.binary_all or name in self.binary_outputs


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        raise ProtocolError(f"{what} 'shape' must be a list of at most {MAX_RANK} dimensions")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in value):
        raise ProtocolError(f"{what} 'shape' {value} must hold non-negative integers")
    return tuple(value)


def _bool_param(params: Mapping[str, Any], key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} parameter {key!r} must be true or false")
    return value


def _flatten(data: Any, out: list[Any], depth: int = 0) -> None:
    if depth > MAX_RANK:
        raise ProtocolError(f"tensor data nested deeper than {MAX_RANK} levels")
    for item in data:
        if isinstance(item, list):
            _flatten(item, out, depth + 1)
        else:
            out.append(item)


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    flat: list[Any] = []
    _flatten(data, flat)
    count = math.prod(shape)
    if len(flat) != count:
        raise ProtocolError(f"{what} has {len(flat)} elements in 'data' but shape {list(shape)} holds "
                            f"{count}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{what} is BYTES: 'data' must hold strings")
        array = np.empty(count, dtype=object)
        array[:] = [v.encode("utf-8") for v in flat]
        return array.reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise ProtocolError(f"{what} is BOOL: 'data' must hold true/false")
    elif datatype.startswith(("INT", "UINT")):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise ProtocolError(f"{what} is {datatype}: 'data' must hold integers")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise ProtocolError(f"{what} is {datatype}: 'data' must hold numbers")
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"{what}: 'data' does not fit {datatype} ({exc})") from None


def _binary_tensor(raw: bytes, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype != "BYTES":
        dtype = DATATYPES[datatype].newbyteorder("<")
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(f"{what}: binary_data_size {len(raw)} bytes, but shape {list(shape)} of "
                                f"{datatype} takes {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).astype(DATATYPES[datatype], copy=False).reshape(shape)
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError(f"{what}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise ProtocolError(f"{what}: BYTES element runs past the end of its binary data")
        items.append(raw[pos : pos + size])
        pos += size
    if len(items) != count:
        raise ProtocolError(f"{what} has {len(items)} BYTES elements but shape {list(shape)} holds {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Decode an infer request body (JSON, or JSON header + binary tensors); malformed → ProtocolError."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer"
                                ) from None
        if not 0 < split <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {split} does not fit the {len(body)}-byte "
                                "body")
        header, binary = body[:split], body[split:]
    else:
        header, binary = body, b""
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError):
        raise ProtocolError("request body is not valid JSON (or its binary part has no "
                            "Inference-Header-Content-Length header)") from None
    doc = _object(doc, "the request")
    params = _object(doc.get("parameters") or {}, "'parameters'")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, item in enumerate(inputs):
        item = _object(item, f"inputs[{i}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"inputs[{i}] needs a 'name'")
        what = f"input {name!r}"
        if name in arrays:
            raise ProtocolError(f"{what} is given twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"{what}: unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})")
        shape = _shape(item.get("shape"), what)
        in_params = _object(item.get("parameters") or {}, f"{what} 'parameters'")
        size = in_params.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise ProtocolError(f"{what} has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"{what}: binary_data_size {size!r} runs past the binary part of the "
                                    f"body ({len(binary)} bytes)")
            arrays[name] = _binary_tensor(binary[offset : offset + size], datatype, shape, what)
            offset += size
        elif "data" in item:
            arrays[name] = _json_tensor(item["data"], datatype, shape, what)
        else:
            raise ProtocolError(f"{what} has neither 'data' nor parameters.binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    request = InferRequest(arrays, datatypes, binary_all=_bool_param(params, "binary_data_output", "request"))
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise ProtocolError("'id' must be a string")
        request.id = rid
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("'outputs' must be a list")
        request.outputs = []
        for j, out in enumerate(outputs):
            out = _object(out, f"outputs[{j}]")
            name = out.get("name")
            if not isinstance(name, str) or not name:
                raise ProtocolError(f"outputs[{j}] needs a 'name'")
            request.outputs.append(name)
            if _bool_param(_object(out.get("parameters") or {}, f"output {name!r} 'parameters'"),
                           "binary_data", f"output {name!r}"):
                request.binary_outputs.add(name)
    return request


def _bytes_payload(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def encode_infer_response(model: str, outputs: Mapping[str, np.ndarray], request: InferRequest,
                          version: str = "1") -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of an infer response: JSON ``data``, or the binary-data extension per output."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in outputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.wants_binary(name):
            blob = _bytes_payload(array) if datatype == "BYTES" else np.ascontiguousarray(
                array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                             for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode("utf-8")
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


def tensor_metadata(name: str, dtype: Any, shape: Sequence[Any] | None) -> dict[str, Any]:
    """``{"name", "datatype", "shape"}`` as the protocol's model metadata gives it (-1 for a dynamic axis)."""
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in (shape or [])]
    return {"name": name, "datatype": datatype_of(dtype), "shape": dims}
