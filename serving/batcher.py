"""Dynamic batching over N model instances, each on its own slice of the CPUs.

Requests wait in one queue. A free instance takes the oldest request and, with batching on, gathers the
queued requests whose tensors fit together (same dtypes and non-batch shapes) until the batch holds
``max_batch`` rows or the oldest request has waited ``max_delay`` seconds; the batch runs as one call and its
outputs are split back row by row. With batching off each request runs alone (the baseline Triton calls "no
dynamic_batching").

Threads: instance *i* runs in its own thread, pinned to its own share of the CPUs this process may use
(``os.sched_setaffinity`` on the thread), and builds its session *inside* that thread, so ONNX Runtime's
intra-op pool inherits the pin; ``intra_op_num_threads`` is that share. N instances on C cores therefore use
C threads, not N × C. ORT's inference runs release the GIL, so instances run truly in parallel.

If a batch fails, its requests are retried one by one: a request with bad values (a token id past the
vocabulary) fails alone, not the strangers it was batched with.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
Observer = Callable[[str, float], None]  # (what, value): "queue_seconds", "batch_rows", "batch_requests"


@dataclass(eq=False)  # identity: the queue removes *this* request, never compares tensors
class Pending:
    """One queued request: its feeds (batch on axis 0), rows, compatibility key, and where its answer goes."""

    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    enqueued: float = field(default_factory=time.perf_counter)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def batch_key(feeds: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    """Requests batch together when every input has the same dtype and the same non-batch shape."""
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())


def cpu_slices(instances: int, cpus: Sequence[int] | None = None) -> list[list[int]]:
    """Each instance's CPUs: the usable CPUs split into ``instances`` equal shares (shared round-robin
    when there are more instances than CPUs)."""
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = list(range(os.cpu_count() or 1))
    cpus = list(cpus) or [0]
    if instances >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(instances)]
    per = len(cpus) // instances
    return [cpus[i * per : (i + 1) * per] for i in range(instances)]


def _pin(cpus: Sequence[int]) -> None:
    # Linux: pid 0 is the calling thread; the threads it starts (ORT's pool) inherit the mask
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, set(cpus))


class DynamicBatcher:
    """Queue + ``instances`` worker threads; ``make_runner(threads)`` builds one instance's run function
    (called in the worker thread after it is pinned)."""

    def __init__(self, make_runner: Callable[[int], RunFn], *, instances: int = 1, max_batch: int = 8,
                 max_delay_s: float = 0.002, batching: bool = True, observe: Observer | None = None,
                 name: str = "model") -> None:
        if instances < 1 or max_batch < 1 or max_delay_s < 0:
            raise ValueError("instances and max_batch must be ≥ 1, max_delay_s ≥ 0")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.batching = batching and max_batch > 1
        self.observe = observe or (lambda what, value: None)
        self.slices = cpu_slices(instances)
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._errors: list[BaseException] = []
        self._ready = threading.Barrier(instances + 1)
        self.workers = [threading.Thread(target=self._worker, args=(make_runner, cpus),
                                          name=f"lrdeploy-{name}-{i}", daemon=True)
                         for i, cpus in enumerate(self.slices)]
        for t in self.workers:
            t.start()
        self._ready.wait()  # every instance built (or failed) before the server says it is ready
        if self._errors:
            self.close()
            raise self._errors[0]

    # ------------------------------------------------------------------------------------------ clients
    def submit(self, feeds: dict[str, np.ndarray], rows: int) -> concurrent.futures.Future:
        """Queue a request; its future gets the outputs for its own rows."""
        item = Pending(feeds, rows, batch_key(feeds))
        with self._cond:
            if self._closing:
                raise RuntimeError("the batcher is shut down")
            self._queue.append(item)
            self._cond.notify()
        return item.future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests; the queued ones still run (drain), then the workers exit."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self.workers:
            if t.is_alive():
                t.join(timeout)

    # ------------------------------------------------------------------------------------------ workers
    def _worker(self, make_runner: Callable[[int], RunFn], cpus: list[int]) -> None:
        _pin(cpus)
        try:
            run = make_runner(len(cpus))
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor, raised there
            self._errors.append(exc)
            self._ready.wait()
            return
        self._ready.wait()
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._execute(run, batch)
            except BaseException as exc:  # noqa: BLE001 - a bug here must fail its requests, not hang them
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _take(self) -> list[Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            if not self.batching:
                return batch
            deadline = first.enqueued + self.max_delay_s
            while rows < self.max_batch:
                for item in list(self._queue):
                    if item.key == first.key and rows + item.rows <= self.max_batch:
                        self._queue.remove(item)
                        batch.append(item)
                        rows += item.rows
                        if rows >= self.max_batch:
                            break
                left = deadline - time.perf_counter()
                if rows >= self.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            if self._queue:
                self._cond.notify()  # what this batch left behind is another instance's work
            return batch

    def _execute(self, run: RunFn, batch: list[Pending]) -> None:
        start = time.perf_counter()
        for item in batch:
            self.observe("queue_seconds", start - item.enqueued)
        self.observe("batch_rows", sum(i.rows for i in batch))
        self.observe("batch_requests", len(batch))
        if len(batch) == 1:
            self._run_one(run, batch[0])
            return
        try:
            feeds = {name: np.concatenate([i.feeds[name] for i in batch]) for name in batch[0].feeds}
            outputs = run(feeds)
        except Exception:  # noqa: BLE001 - one bad request must not fail the others: retry each alone
            for item in batch:
                self._run_one(run, item)
            return
        bounds = np.cumsum([i.rows for i in batch])[:-1]
        parts = {name: np.split(value, bounds) for name, value in outputs.items()}
        for k, item in enumerate(batch):
            item.future.set_result({name: parts[name][k] for name in parts})

    @staticmethod
    def _run_one(run: RunFn, item: Pending) -> None:
        try:
            item.future.set_result(run(item.feeds))
        except Exception as exc:  # noqa: BLE001 - the request's own failure, answered to it
            item.future.set_exception(exc)
