"""One served model: its ONNX graph's inputs and outputs, request validation, tokenisation, its batcher.

Requests are checked against the graph before they queue, so a wrong input name, datatype, rank or fixed
dimension, or a batch over the model's maximum, is a 400 that names the problem, not an ONNX Runtime error
halfway through a batch of other people's requests. A model is *batchable* when every input's and output's
first axis is dynamic; others run one request at a time at their fixed batch.

Text models (an encoder exported with its ``<stem>.tokenizer.json`` beside the graph) also take raw strings:
one BYTES input (``text``, shape ``[N]``) is tokenised with that tokenizer (truncation and padding as export
set them) into the graph's ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``). Each request is padded
to its own longest sentence, so requests batch together only when their padded lengths agree (the batcher
never pads across requests: it cannot know that a graph ignores padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .batcher import DynamicBatcher, RunFn
from .protocol import InferRequest, ProtocolError, datatype_of, tensor_metadata
from .runtimes.base import IOInfo

TEXT_INPUT = "text"
TOKEN_INPUTS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


@dataclass
class ServingConfig:
    """How every model is served (the CLI's flags)."""

    max_batch: int = 32
    max_delay_ms: float = 2.0
    batching: bool = True
    instances: int = 1


def tokenizer_path(onnx_path: Path) -> Path:
    """Where export writes an encoder's tokenizer: ``<stem>.tokenizer.json`` beside ``<stem>.onnx``."""
    name = onnx_path.name
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else onnx_path.stem
    return onnx_path.with_name(stem + ".tokenizer.json")


def _dynamic(dim: Any) -> bool:
    return not (isinstance(dim, int) and dim >= 0)


def ort_runner(path: Path, spin: bool) -> Any:
    """``make_runner(threads)`` for the batcher: one CPU ``InferenceSession`` per instance, created in the
    instance's (pinned) thread with the session options every lrdeploy measurement uses."""
    from lrdeploy.host import session_options

    from .runtimes.ort_session import CPU_PROVIDER, make_session

    def make(threads: int) -> RunFn:
        options = session_options(threads)
        if not spin:  # several instances: a spinning idle pool would steal the other instances' cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = make_session(path, [CPU_PROVIDER], sess_options=options)
        names = [o.name for o in session.get_outputs()]

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, dict(feeds)), strict=True))

        return run

    return make


def graph_io(path: Path) -> tuple[list[IOInfo], list[IOInfo]]:
    """Inputs and outputs of an ONNX file, read with a throwaway one-thread session (what ORT will run)."""
    from lrdeploy.host import session_options

    from .runtimes.ort_session import CPU_PROVIDER, make_session, session_io

    io = session_io(make_session(path, [CPU_PROVIDER], sess_options=session_options(1)))
    return list(io.inputs), list(io.outputs)


@dataclass
class ServedModel:
    """A model the server answers for; :meth:`start` builds its instances."""

    name: str
    path: Path
    inputs: list[IOInfo]
    outputs: list[IOInfo]
    summary: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    max_batch: int = 32
    batcher: DynamicBatcher | None = None

    @classmethod
    def load(cls, name: str, path: Path, config: ServingConfig, summary: Mapping[str, Any] | None = None
             ) -> ServedModel:
        inputs, outputs = graph_io(path)
        model = cls(name, path, inputs, outputs, dict(summary or {}))
        tok = tokenizer_path(path)
        if tok.is_file() and any(i.name in TOKEN_INPUTS for i in inputs):
            from tokenizers import Tokenizer

            model.tokenizer = Tokenizer.from_file(str(tok))
            if model.tokenizer.padding is None:  # a batch of strings becomes one rectangular tensor
                model.tokenizer.enable_padding()
        model.max_batch = config.max_batch if model.batchable else model._fixed_batch()
        return model

    @property
    def batchable(self) -> bool:
        return all(io.shape and _dynamic(io.shape[0]) for io in (*self.inputs, *self.outputs))

    def _fixed_batch(self) -> int:
        dims = [io.shape[0] for io in self.inputs if io.shape and not _dynamic(io.shape[0])]
        return int(dims[0]) if dims else 1

    def start(self, config: ServingConfig, observe: Any = None) -> None:
        self.batcher = DynamicBatcher(
            ort_runner(self.path, spin=config.instances == 1), instances=config.instances,
            max_batch=self.max_batch, max_delay_s=config.max_delay_ms / 1000.0,
            batching=config.batching and self.batchable, observe=observe, name=self.name)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    # ----------------------------------------------------------------------------------------- metadata
    def metadata(self) -> dict[str, Any]:
        """The protocol's model metadata, plus ``lrdeploy``: the manifest summary and how it is served."""
        batch_axis = [-1] if self.batchable else []
        extra: dict[str, Any] = {"summary": self.summary, "max_batch_size": self.max_batch,
                                 "batchable": self.batchable}
        if self.tokenizer is not None:
            extra["text_input"] = {"name": TEXT_INPUT, "datatype": "BYTES", "shape": batch_axis or [-1],
                                   "tokenizer": tokenizer_path(self.path).name}
        return {
            "name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(i.name, i.dtype, i.shape) for i in self.inputs],
            "outputs": [tensor_metadata(o.name, o.dtype, o.shape) for o in self.outputs],
            "lrdeploy": extra,
        }

    # -------------------------------------------------------------------------------------- validation
    def feeds(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        """The graph's feeds and row count of a request; anything that does not fit → ProtocolError (400)."""
        if request.outputs is not None:
            known = {o.name for o in self.outputs}
            unknown = [n for n in request.outputs if n not in known]
            if unknown:
                raise ProtocolError(f"model {self.name!r} has no output {unknown[0]!r} "
                                    f"(outputs: {', '.join(sorted(known))})")
        given = request.inputs
        if self.tokenizer is not None and any(request.datatypes[n] == "BYTES" for n in given):
            feeds = self._tokenise(request)
        else:
            feeds = self._tensors(given, request.datatypes)
        rows = self._rows(feeds)
        if self.batchable and rows > self.max_batch:
            raise ProtocolError(f"batch of {rows} exceeds model {self.name!r}'s maximum batch size "
                                f"{self.max_batch}")
        return feeds, rows

    def _tensors(self, given: Mapping[str, np.ndarray], datatypes: Mapping[str, str]
                 ) -> dict[str, np.ndarray]:
        names = [i.name for i in self.inputs]
        unknown = [n for n in given if n not in names]
        missing = [n for n in names if n not in given]
        if unknown or missing:
            what = f"unknown input {unknown[0]!r}" if unknown else f"missing input {missing[0]!r}"
            raise ProtocolError(f"model {self.name!r}: {what} (inputs: {', '.join(names)})")
        feeds: dict[str, np.ndarray] = {}
        for info in self.inputs:
            array, datatype = given[info.name], datatypes[info.name]
            want = datatype_of(info.dtype)
            if datatype != want:
                raise ProtocolError(f"model {self.name!r}: input {info.name!r} is {want}, got {datatype}")
            shape = info.shape or ()
            fits = array.ndim == len(shape) and all(
                _dynamic(d) or d == n for d, n in zip(shape, array.shape, strict=True))
            if not fits:
                expects = [d if not _dynamic(d) else -1 for d in shape]
                raise ProtocolError(f"model {self.name!r}: input {info.name!r} has shape "
                                    f"{list(array.shape)}, expects {expects} (-1: any size)")
            feeds[info.name] = array
        return feeds

    def _rows(self, feeds: Mapping[str, np.ndarray]) -> int:
        rows = {a.shape[0] if a.ndim else 1 for a in feeds.values()}
        if len(rows) != 1:
            raise ProtocolError(f"model {self.name!r}: inputs disagree on the batch size ({sorted(rows)})")
        n = rows.pop()
        if n < 1:
            raise ProtocolError(f"model {self.name!r}: empty batch")
        return int(n)

    def _tokenise(self, request: InferRequest) -> dict[str, np.ndarray]:
        if len(request.inputs) != 1:
            raise ProtocolError(f"model {self.name!r}: send the strings as one BYTES input "
                                f"{TEXT_INPUT!r}, alone")
        array = next(iter(request.inputs.values()))
        if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1):
            raise ProtocolError(f"model {self.name!r}: text input has shape {list(array.shape)}, expects [N] "
                                "or [N, 1]")
        try:
            texts = [b.decode("utf-8") for b in array.reshape(-1)]
        except UnicodeDecodeError:
            raise ProtocolError(f"model {self.name!r}: text input is not UTF-8") from None
        encoded = self.tokenizer.encode_batch(texts)
        feeds = {}
        for info in self.inputs:
            field_name = TOKEN_INPUTS.get(info.name)
            if field_name is None:
                raise ProtocolError(f"model {self.name!r} takes {info.name!r}, which the tokenizer does not "
                                    "make: send tensors")
            feeds[info.name] = np.array([getattr(e, field_name) for e in encoded], dtype=info.dtype)
        return feeds
