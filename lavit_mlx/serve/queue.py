"""The bounded request queue and the one thread that runs MLX work.

HTTP lives on the event loop; every model call happens on this one worker thread, so the
model is shared without contention and MLX sees one caller. A request becomes a `Job`:

- `Worker.submit` refuses it with a 429 (and a `Retry-After` estimate) when `max_queue`
  jobs are already waiting; the job being run does not count.
- Jobs with the same `batch_key` that wait together run as one batch (up to `max_batch`):
  understanding requests with the same decoding settings share one forward.
- A runner is a generator of `(index in the batch, event)` pairs, one or more per step
  of the pipeline. After each pair the worker checks every job of the batch: a cancelled
  job (its client went away) or one past its time limit gets nothing more, and once no
  job of the batch is open the runner is closed, so the work stops at the next step.
- Every exception of a runner ends as an `APIError` delivered to the jobs of the batch;
  the thread never dies of a request.

This module is plain Python (no MLX, no FastAPI): the runners know the model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

from ..cpu.runtime import release_free_memory
from ..errors import CheckpointError, LaVITError
from .errors import APIError, invalid, server_error

log = logging.getLogger("lavit.serve")

Runner = Callable[[Any, Sequence[Any]], Iterator[Tuple[int, Any]]]


@dataclass
class Result:
    """The last event of a job: what its runner produced."""

    value: Any


@dataclass(eq=False)
class Job:
    """One request waiting for (or on) the worker.

    `deliver(event)` is called on the worker thread with each event meant for this job
    (progress, then one `Result` or `APIError`); it must be thread-safe.
    """

    kind: str
    request: Any
    deliver: Callable[[Any], None]
    time_limit: float
    batch_key: Optional[Hashable] = None  # None: runs alone
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # its last event has been delivered

    @property
    def deadline(self) -> float:
        return self.created + self.time_limit


def closed() -> APIError:
    """The last event of a cancelled job: its request's coroutine ends (nobody reads the answer)."""
    return APIError(499, "the client closed the request", code="client_closed")


class Worker:
    """The MLX thread and its queue.

    Args:
        model: passed to the runners.
        runners: {job kind: runner(model, requests) -> (index, event) pairs}.
        max_queue: jobs that may wait; more are refused with a 429.
        max_batch: most jobs of one batch key run together.
        batch_wait: the most seconds the worker waits, before running a batch, for the
            requests that are still being checked (`arriving`): requests sent together
            reach the queue some milliseconds apart. Nothing arriving: no wait.
    """

    def __init__(self, model, runners: Dict[str, Runner], max_queue: int = 16, max_batch: int = 8,
                 batch_wait: float = 0.1):
        if max_queue < 1 or max_batch < 1:
            raise LaVITError(f"queue size {max_queue} and batch size {max_batch} must be at least 1")
        self.model = model
        self.runners = runners
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self._pending: Deque[Job] = deque()
        self._running: List[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._arriving = 0  # batchable requests being checked on the HTTP side
        self._thread: Optional[threading.Thread] = None
        self._seconds_per_job = 1.0  # running mean of a job's share of its batch, for Retry-After
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "refused": 0,
                       "batches": 0, "batched_jobs": 0, "largest_batch": 0}

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lavit-mlx-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job and end the thread (it stops at the running job's next step).

        Jobs still waiting get their last event now; the running one at its next step."""
        with self._cond:
            self._stopping = True
            for job in [*self._pending, *self._running]:
                job.cancelled.set()
            for job in self._pending:
                self._finish(job, closed(), "cancelled")
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 429 `APIError` (with Retry-After) when the queue is full."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                self.counts["refused"] += 1
                wait = self._retry_after()
                raise APIError(429, f"the server is busy: {len(self._pending)} requests are waiting; "
                                    f"retry in {wait} s", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(wait)})
            self._pending.append(job)
            self._cond.notify_all()

    @contextmanager
    def arriving(self):
        """Held by the HTTP side while it checks a batchable request, so that the worker,
        about to run a batch, waits for it (at most `batch_wait`)."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job from the queue, or stop it at its next step."""
        with self._cond:
            job.cancelled.set()
            try:
                self._pending.remove(job)
            except ValueError:
                return
            if not job.finished:
                self._finish(job, closed(), "cancelled")

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._pending), "running": len(self._running), "max_queue": self.max_queue,
                    "max_batch": self.max_batch, **self.counts}

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._seconds_per_job * (len(self._pending) + 1))))

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            start = time.monotonic()
            try:
                self._execute(jobs)
            except BaseException:  # noqa: BLE001 - the thread must outlive any request
                log.exception("the worker failed outside a runner")
            finally:
                with self._cond:
                    self._running = []
                    idle = not self._pending
                if idle:  # no work holds the heap's free pages now: give them back
                    release_free_memory()
                share = (time.monotonic() - start) / len(jobs)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * share

    def _take(self) -> Optional[List[Job]]:
        """The next job and the jobs waiting with the same batch key (oldest first)."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            head = self._pending.popleft()
            batch = [head]
            if head.batch_key is not None and self.max_batch > 1:
                self._running = batch  # visible as running while it waits for company
                # Requests still being checked will likely join: wait for them, briefly.
                end = time.monotonic() + self.batch_wait
                while (self._arriving and not self._stopping and time.monotonic() < end
                       and sum(j.batch_key == head.batch_key for j in self._pending) < self.max_batch - 1):
                    self._cond.wait(max(0.0, end - time.monotonic()))
                for job in list(self._pending):
                    if len(batch) == self.max_batch:
                        break
                    if job.batch_key == head.batch_key:
                        self._pending.remove(job)
                        batch.append(job)
            self._running = batch
            return batch

    def _open(self, job: Job) -> bool:
        """Whether the job still wants events; closes it (cancelled or timed out) when not."""
        if job.finished:
            return False
        if job.cancelled.is_set():
            self._finish(job, closed(), "cancelled")
            return False
        if time.monotonic() > job.deadline:
            self._finish(job, APIError(504, f"the request took longer than the server's limit of "
                                            f"{job.time_limit:g} s", type="server_error", code="timeout"),
                         "timed_out")
            return False
        return True

    def _finish(self, job: Job, event: Any, outcome: str) -> None:
        job.finished = True
        self.counts[outcome] += 1
        self._send(job, event)

    @staticmethod
    def _send(job: Job, event: Any) -> None:
        try:
            job.deliver(event)
        except Exception:  # noqa: BLE001 - e.g. the event loop is closing
            log.warning("could not deliver an event of a %s job", job.kind, exc_info=True)

    def _execute(self, jobs: List[Job]) -> None:
        live = [job for job in jobs if self._open(job)]
        if not live:
            return
        if len(live) > 1:
            self.counts["batches"] += 1
            self.counts["batched_jobs"] += len(live)
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(live))
        stages = None
        try:
            stages = self.runners[live[0].kind](self.model, [job.request for job in live])
            for index, event in stages:
                job = live[index]
                if isinstance(event, Result):
                    if self._open(job):
                        self._finish(job, event, "completed")
                elif event is not None and self._open(job):
                    self._send(job, event)
                if not any(self._open(j) for j in live):
                    break  # every client has gone (or timed out): stop at this step
        except APIError as exc:
            self._fail(live, exc)
        except CheckpointError as exc:  # the server's checkpoint, not the request, is at fault
            log.error("checkpoint error: %s", exc)
            self._fail(live, server_error(str(exc)))
        except LaVITError as exc:
            self._fail(live, invalid(str(exc)))
        except MemoryError:
            self._fail(live, APIError(503, "out of memory for this request; try a smaller size or fewer images",
                                      type="server_error", code="out_of_memory"))
        except Exception:  # noqa: BLE001 - the process never dies of a request
            log.exception("a %s request failed", live[0].kind)
            self._fail(live, server_error())
        finally:
            if stages is not None:
                stages.close()
        self._fail(live, server_error("the pipeline ended without a result"))

    def _fail(self, jobs: Sequence[Job], error: APIError) -> None:
        for job in jobs:
            if self._open(job):
                self._finish(job, error, "failed")
