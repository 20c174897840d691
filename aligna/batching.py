"""Dynamic batching: requests that arrive together are decoded together.

One `BatchWorker` owns one model. Callers (HTTP handlers on an event loop, or plain
threads) `submit` a job: some texts and a hashable `key` that stands for everything that
must be equal for jobs to share a batch (the search options, the attention wanted). The
worker thread takes the oldest waiting job, adds later jobs with the same key up to
`max_batch` texts, waiting at most `max_wait_ms` after the oldest job arrived for more to
come, then calls ``run_batch(texts, key, places)`` once (places[i]: text i's place in its own
job, for a result that must not depend on the batch) and hands each job its slice of the results.

* FIFO: the oldest job always heads the next batch, so a job with rare options waits for
  at most one batch per job ahead of it; jobs with the same key never overtake it either.
* A job whose future was cancelled before its batch starts (the client went away) is
  dropped: nothing is decoded for it.
* If a batch fails, each of its jobs is retried alone, so one bad job fails only itself.
* ``run_batch`` runs in the worker thread under ``torch.inference_mode()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("aligna")

RunBatch = Callable[[list[str], Any, list[int]], Sequence[Any]]  # (texts, key, places) -> one result per text


@dataclass
class Job:
    texts: list[str]
    key: Hashable
    future: Future = field(default_factory=Future)  # resolves to the list of this job's results
    enqueued: float = field(default_factory=time.monotonic)

    def cancel(self) -> bool:
        """Drop the job if its batch has not started; True if it will not be decoded."""
        return self.future.cancel()


class WorkerStopped(RuntimeError):
    """The worker is not running (not started yet, or stopped): no job can be decoded."""


MAX_WAIT_MS = 60_000.0  # a batch waits at most a minute for more requests


def check_max_wait(ms: float) -> None:
    """A ValueError unless `ms` is a wait a batch can take: 0 to MAX_WAIT_MS (nan fails too)."""
    if not 0 <= ms <= MAX_WAIT_MS:
        raise ValueError(f"max_wait_ms: {ms} is out of range; allowed: 0 to {MAX_WAIT_MS:g}")


class BatchWorker:
    def __init__(self, run_batch: RunBatch, max_batch: int = 32, max_wait_ms: float = 10.0,
                 name: str = "model") -> None:  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"max_batch: {max_batch} is out of range; allowed: integers >= 1")
        check_max_wait(max_wait_ms)
        self.run_batch, self.max_batch, self.max_wait, self.name = (
            run_batch,
            max_batch,
            max_wait_ms / 1000,
            name,
        )
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._taken: list[Job] = []  # the batch taken off the queue, until it is decoded
        self.batches = 0  # run_batch calls that succeeded
        self.texts = 0  # texts decoded in them

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BatchWorker:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"worker {self.name!r} was already started")
            self._thread = threading.Thread(target=self._loop, name=f"aligna-batch-{self.name}", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in progress, fail the jobs still waiting, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._cond:
            left, self._queue = list(self._queue), deque()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerStopped(f"model {self.name!r} is shutting down"))

    def pending(self) -> int:
        """Jobs waiting for a batch (cancelled ones included until the worker drops them)."""
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------ submitting

    def submit(self, texts: Sequence[str], key: Hashable) -> Job:
        """Queue a job (thread-safe); its future resolves to one result per text."""
        job = Job(list(texts), key)
        with self._cond:
            if not self.running:
                raise WorkerStopped(f"model {self.name!r} is not running")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    async def run(self, texts: Sequence[str], key: Hashable) -> list[Any]:
        """`submit` and await the results; if the awaiting task is cancelled, the job is too."""
        job = self.submit(texts, key)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    # ------------------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while True:
                    batch = self._next_batch()
                    if batch is None:
                        return
                    self._decode(batch)
                    self._taken = []
        except BaseException as e:  # a bug here: fail every job rather than leave it waiting forever
            log.critical("model %r: the batch worker stopped", self.name, exc_info=True)
            stopped = WorkerStopped(f"model {self.name!r}: its batch worker stopped ({type(e).__name__})")
            for job in self._taken:  # off the queue already: `stop` would not see them
                future = job.future
                if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
                    future.set_exception(stopped)
            self.stop(timeout=0)  # the thread ends here (a SystemExit raised on would end only it, too)

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job and the live jobs with its key behind it, up to max_batch
        texts, waiting until max_wait after the oldest job arrived; None when stopping."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._queue.popleft()
                if self._stopping:
                    return None
                if self._queue:
                    break
                self._cond.wait()
            head = self._queue.popleft()
            batch, size = [head], len(head.texts)
            self._taken = batch  # the jobs that join it below too
            deadline = head.enqueued + self.max_wait
            while size < self.max_batch:
                kept: deque[Job] = deque()
                full = False
                for job in self._queue:
                    if job.future.cancelled():
                        continue
                    if full or job.key != head.key:
                        kept.append(job)
                    elif size + len(job.texts) <= self.max_batch:
                        batch.append(job)
                        size += len(job.texts)
                    else:  # it heads a later batch; nothing with this key overtakes it
                        full = True
                        kept.append(job)
                self._queue = kept
                remaining = deadline - time.monotonic()
                if full or size >= self.max_batch or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
        return batch

    def _decode(self, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # False: cancelled
        if not live:
            return
        try:
            self._resolve(live)
        except Exception as e:
            if len(live) == 1:
                log.error("model %r: decoding failed", self.name, exc_info=True)
                live[0].future.set_exception(e)
                return
            log.warning("model %r: a batch of %d requests failed (%s: %s); retrying each alone",
                        self.name, len(live), type(e).__name__, e)  # fmt: skip
            for job in live:
                try:
                    self._resolve([job])
                except Exception as e1:
                    log.error("model %r: decoding failed", self.name, exc_info=True)
                    job.future.set_exception(e1)

    def _resolve(self, jobs: list[Job]) -> None:
        texts = [t for job in jobs for t in job.texts]
        places = [i for job in jobs for i in range(len(job.texts))]
        results = list(self.run_batch(texts, jobs[0].key, places)) if texts else []
        if len(results) != len(texts):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(texts)} texts")
        self.batches += 1
        self.texts += len(texts)
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.texts)])
            start += len(job.texts)
